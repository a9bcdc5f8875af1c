"""Display names of the 133 COCO-panoptic classes of OMG-Seg's open-vocabulary class-embedding file
(`convnext_large_d_320_CocoPanopticOVDataset.pth`), in its row order: the first synonym of each class
of OMG-Seg's `CocoPanopticOVDataset` (80 things, then 53 stuff classes)."""

COCO_PANOPTIC_THINGS = 80

COCO_PANOPTIC_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange fruit", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "tv remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissor",
    "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door", "wood floor", "flower", "fruit",
    "gravel", "house", "lamp", "mirror", "tennis net", "pillow", "platform", "playingfield", "railroad", "river",
    "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "brick wall", "stone wall",
    "tile wall", "wood wall", "water", "window blind", "window", "tree", "fence", "ceiling", "sky", "cabinet",
    "table", "floor", "pavement", "mountain", "grass", "dirt", "paper", "food", "building", "rock", "wall", "rug",
)  # fmt: skip
