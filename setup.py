"""pip install for omg_llava_ros (ROS-free use). On a ROS 2 system colcon builds it with CMakeLists.txt."""

from setuptools import find_packages, setup

setup(
    name="omg_llava_ros",
    version="0.1.0",
    description="OMG-LLaVA as a ROS 2 perception node: grounded segmentation from language commands",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["omg_llava_ros", "omg_llava_ros.*"]),
    include_package_data=True,
    package_data={"omg_llava_ros": ["weights/**/*", "data/**/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "tokenizers",
        "safetensors",
        "timm>=1.0",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "scipy",
    ],
    extras_require={
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "replay": ["rosbags"],
        # the node on plain Cyclone DDS (no ROS install): python -m omg_llava_ros.ros.node --transport dds
        "dds": ["cyclonedds==11.0.1", "rosbags", "pyyaml"],
        "convert": ["sentencepiece>=0.2.0", "protobuf>=4.21"],
        "lora": ["peft>=0.21"],
        "test": ["pytest", "ruff"],
    },
    entry_points={"console_scripts": ["omg-llava-ros = omg_llava_ros.cli:main"]},
)
