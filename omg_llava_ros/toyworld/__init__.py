"""The tabletop world of shared/toyworld.md: scenes, renderer, referring expressions, conversations,
visual prompts and moving scenes, generated on the fly from a `numpy.random.Generator` (same seed,
same output). numpy and OpenCV only, so data generation never imports torch.

Typical use::

    rng = np.random.default_rng(seed)
    rendered = render(sample_scene(rng))
    sample = sample_conversation(rng, rendered)
"""

from __future__ import annotations

from omg_llava_ros.toyworld.conversations import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    SEG_TOKEN,
    TASKS,
    Sample,
    caption_answer,
    describe,
    gcg_answer,
    left_to_right,
    plural,
    sample_attribute,
    sample_caption,
    sample_conversation,
    sample_counting,
    sample_existence,
    sample_grounded_caption,
    sample_referring_segmentation,
    sample_region_caption,
    sample_region_color,
)
from omg_llava_ros.toyworld.moving import MAX_STEP, MAX_TURN, MovingScene, sample_moving_scene, step_scene
from omg_llava_ros.toyworld.prompts import (
    PROMPT_KINDS,
    VisualPrompt,
    box_prompt,
    mask_prompt,
    point_prompt,
    sample_prompt,
)
from omg_llava_ros.toyworld.referring import (
    Expression,
    all_unique_expressions,
    enumerate_expressions,
    referable_objects,
    sample_expression,
    shortest_expression,
)
from omg_llava_ros.toyworld.render import ANTIALIAS_MODES, ObjectGT, RenderedScene, render
from omg_llava_ros.toyworld.scene import (
    COLORS,
    NATIVE_SIZE,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    article,
    make_object,
    number_word,
    sample_scene,
)

__all__ = [
    "IMAGE_TOKEN",
    "REGION_TOKEN",
    "SEG_TOKEN",
    "TASKS",
    "Sample",
    "caption_answer",
    "describe",
    "gcg_answer",
    "left_to_right",
    "plural",
    "sample_attribute",
    "sample_caption",
    "sample_conversation",
    "sample_counting",
    "sample_existence",
    "sample_grounded_caption",
    "sample_referring_segmentation",
    "sample_region_caption",
    "sample_region_color",
    "MAX_STEP",
    "MAX_TURN",
    "MovingScene",
    "sample_moving_scene",
    "step_scene",
    "PROMPT_KINDS",
    "VisualPrompt",
    "box_prompt",
    "mask_prompt",
    "point_prompt",
    "sample_prompt",
    "Expression",
    "all_unique_expressions",
    "enumerate_expressions",
    "referable_objects",
    "sample_expression",
    "shortest_expression",
    "ANTIALIAS_MODES",
    "ObjectGT",
    "RenderedScene",
    "render",
    "COLORS",
    "NATIVE_SIZE",
    "NUMBER_WORDS",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "Scene",
    "article",
    "make_object",
    "number_word",
    "sample_scene",
]
