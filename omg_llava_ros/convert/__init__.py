"""Conversion of the released OMG-LLaVA weights into this package's model directory."""

from omg_llava_ros.convert.files import ConversionError
from omg_llava_ros.convert.official import ConvertOptions, OfficialFiles, convert_official

__all__ = ["ConversionError", "ConvertOptions", "OfficialFiles", "convert_official"]
