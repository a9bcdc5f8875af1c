"""Moving scenes for follow mode (toyworld.md, "Moving scenes").

Every object keeps its index in every frame, so following the command's target is the identity on
object indices and its per-frame masks are the ground truth of tracking. Motion is smooth rather
than white noise: each object carries a velocity and an angular velocity that drift a little per
frame (within the limits), which looks like things being pushed around rather than shaking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from omg_llava_ros.toyworld.conversations import Sample, sample_referring_segmentation
from omg_llava_ros.toyworld.render import AntiAlias, RenderedScene, render
from omg_llava_ros.toyworld.scene import NATIVE_SIZE, Scene, fits, sample_scene

MAX_STEP = 6.0  # native px of translation per frame
MAX_TURN = 10.0  # degrees of rotation per frame
_VELOCITY_DRIFT = 1.0  # std of the per-frame velocity change, native px
_TURN_DRIFT = 2.0  # std of the per-frame angular velocity change, degrees
_STEP_TRIES = 20


@dataclass(eq=False)
class MovingScene:
    """Frames of one scene in motion and a referring command on frame 0 for object `target`."""

    scenes: list[Scene]
    frames: list[RenderedScene]
    target: int
    command: Sample  # referring segmentation on frames[0]

    @property
    def target_masks(self) -> list[np.ndarray]:
        """The target's mask in every frame (what follow mode should output)."""
        return [f.objects[self.target].mask for f in self.frames]


def _random_velocity(rng: np.random.Generator) -> np.ndarray:
    # Uniform over the disc of radius MAX_STEP.
    r = MAX_STEP * math.sqrt(rng.random())
    a = rng.uniform(0.0, 2.0 * math.pi)
    return np.array([r * math.cos(a), r * math.sin(a)])


def _clip_norm(v: np.ndarray, limit: float) -> np.ndarray:
    n = float(np.hypot(v[0], v[1]))
    return v if n <= limit else v * (limit / n)


def step_scene(rng: np.random.Generator, scene: Scene, velocity: np.ndarray, spin: np.ndarray) -> Scene:
    """Moves every object one frame; updates `velocity` (N, 2) and `spin` (N,) in place.

    Objects move one after another and each checks against the others' latest positions, so the
    result is valid whenever the input was: a step that would leave the canvas or come too close is
    redrawn, and an object that finds no valid step stays put (always valid, see below).
    """
    objects = list(scene.objects)
    for i, obj in enumerate(objects):
        others = objects[:i] + objects[i + 1 :]
        # Staying put is valid: the objects moved before this one were checked against its
        # current position, the ones after it will be.
        v = _clip_norm(velocity[i] + rng.normal(0.0, _VELOCITY_DRIFT, 2), MAX_STEP)
        for _ in range(_STEP_TRIES):
            center = (obj.center[0] + float(v[0]), obj.center[1] + float(v[1]))
            if fits(center, obj.radius, others):
                break
            v = _random_velocity(rng)
        else:
            v, center = np.zeros(2), obj.center
        velocity[i] = v
        if obj.shape == "circle":
            turn = 0.0
        else:
            turn = float(np.clip(spin[i] + rng.normal(0.0, _TURN_DRIFT), -MAX_TURN, MAX_TURN))
        spin[i] = turn
        objects[i] = replace(obj, center=center, rotation=(obj.rotation + turn) % 360.0)
    return replace(scene, objects=tuple(objects))


def sample_moving_scene(
    rng: np.random.Generator,
    num_frames: int = 10,
    size: int = NATIVE_SIZE,
    *,
    num_objects: int | None = None,
    antialias: AntiAlias | bool = "none",
    ref_mode: str = "shortest",
    draw: Callable[[Scene, int], RenderedScene] | None = None,
) -> MovingScene:
    """A scene and `num_frames` moved copies, rendered at `size`, with a command on frame 0.

    Geometry lives in native units, so the 6 px / 10 degree limits scale with `size`. The table's
    grey level is kept and its noise redrawn per frame; frame t's noise seed is stored in scenes[t].
    `draw(scene, size)` renders a frame instead of `render` (another renderer; `antialias` unused).
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    scene = sample_scene(rng, num_objects)
    n = len(scene.objects)
    velocity = np.stack([_random_velocity(rng) for _ in range(n)])
    spin = rng.uniform(-MAX_TURN, MAX_TURN, n)
    spin[[o.shape == "circle" for o in scene.objects]] = 0.0
    scenes = [scene]
    for _ in range(num_frames - 1):
        moved = step_scene(rng, scenes[-1], velocity, spin)
        scenes.append(replace(moved, noise_seed=int(rng.integers(2**63 - 1))))
    frames = [draw(s, size) if draw else render(s, size, antialias=antialias) for s in scenes]
    command = sample_referring_segmentation(rng, frames[0], ref_mode=ref_mode)
    return MovingScene(scenes=scenes, frames=frames, target=command.object_ids[0], command=command)


def iter_moving_frames(rng: np.random.Generator, num_frames: int, size: int = NATIVE_SIZE) -> Iterator[RenderedScene]:
    """The frames of one scene in motion, rendered one at a time as they are taken (long runs:
    `replay.soak` holds one frame, not a scene's hundreds). Same motion rules as
    `sample_moving_scene`; no command."""
    scene = sample_scene(rng)
    n = len(scene.objects)
    velocity = np.stack([_random_velocity(rng) for _ in range(n)])
    spin = rng.uniform(-MAX_TURN, MAX_TURN, n)
    spin[[o.shape == "circle" for o in scene.objects]] = 0.0
    for k in range(num_frames):
        if k:
            scene = replace(step_scene(rng, scene, velocity, spin), noise_seed=int(rng.integers(2**63 - 1)))
        yield render(scene, size)
