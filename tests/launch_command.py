"""The launch file, rendered into the command line launch_ros would run, without launch/launch_ros.

launch and launch_ros have no PyPI wheels, so ``ros2 launch`` cannot run here. This module loads
``ros2/omg_llava_ros/launch/omg_llava.launch.py`` with small stand-ins for the launch classes it
uses, substitutes the launch arguments, and renders its Node action the way launch_ros does:
``<prefix>/lib/<package>/<executable> --ros-args -r __node:=NAME [-r __ns:=NS]
--params-file FILE... -r FROM:=TO...`` (a dict of parameters becomes a temporary YAML file). The
real-rclpy tests start the node with exactly this command.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "ros2" / "omg_llava_ros" / "launch" / "omg_llava.launch.py"


class _Action:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(_Action):
    @property
    def name(self) -> str:
        return self.args[0]


class ParameterValue(_Action):
    pass


def _stand_in_modules(share_dir: Path) -> dict[str, types.ModuleType]:
    classes = {
        "launch": {"LaunchDescription": type("LaunchDescription", (_Action,), {})},
        "launch.actions": {
            "DeclareLaunchArgument": type("DeclareLaunchArgument", (_Action,), {}),
            "LogInfo": type("LogInfo", (_Action,), {}),
        },
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": type("Node", (_Action,), {})},
        "launch_ros.parameter_descriptions": {"ParameterValue": ParameterValue},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda package: str(share_dir)},
    }
    modules = {}
    for name, members in classes.items():
        module = types.ModuleType(name)
        for key, value in members.items():
            setattr(module, key, value)
        modules[name] = module
    return modules


def load_launch_description(share_dir: Path | None = None) -> tuple[dict[str, dict[str, Any]], Any]:
    """(declared arguments {name: kwargs}, the Node action) of the launch file."""
    share_dir = share_dir or LAUNCH_FILE.parents[1]
    saved = {name: sys.modules.get(name) for name in _stand_in_modules(share_dir)}
    sys.modules.update(_stand_in_modules(share_dir))
    try:
        spec = importlib.util.spec_from_file_location("omg_llava_launch", LAUNCH_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        description = module.generate_launch_description()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    actions = description.args[0]
    declared = {a.args[0]: a.kwargs for a in actions if type(a).__name__ == "DeclareLaunchArgument"}
    (node,) = [a for a in actions if type(a).__name__ == "Node"]
    return declared, node


def _substitute(value: Any, values: Mapping[str, str]) -> str:
    if isinstance(value, LaunchConfiguration):
        return values[value.name]
    if isinstance(value, list):  # a list of substitutions is their concatenation
        return "".join(_substitute(v, values) for v in value)
    return str(value)


def _parameter(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, ParameterValue):
        text = _substitute(value.args[0], values)
        kind = value.kwargs.get("value_type", str)
        return yaml.safe_load(text) if kind is bool else kind(text)
    return yaml.safe_load(_substitute(value, values))


def executable_path(package: str, executable: str) -> Path:
    """Where ``ros2 run``/launch_ros find an executable: <prefix>/lib/<package>/ on AMENT_PREFIX_PATH."""
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        candidate = Path(prefix) / "lib" / package / executable
        if prefix and candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{package}/{executable} is on no AMENT_PREFIX_PATH prefix (is the workspace sourced?)")


def launch_command(launch_arguments: Mapping[str, str], scratch: Path, share_dir: Path | None = None) -> list[str]:
    """The node's command line for ``ros2 launch omg_llava_ros omg_llava.launch.py`` + arguments."""
    declared, node = load_launch_description(share_dir)
    unknown = set(launch_arguments) - set(declared)
    if unknown:
        raise ValueError(f"not launch arguments: {sorted(unknown)}")
    values = {name: kwargs["default_value"] for name, kwargs in declared.items()} | dict(launch_arguments)
    kw = node.kwargs
    command = [str(executable_path(kw["package"], kw["executable"])), *kw.get("arguments", []), "--ros-args"]
    command += ["-r", f"__node:={kw['name']}"]
    namespace = _substitute(kw.get("namespace", ""), values)
    if namespace:
        command += ["-r", f"__ns:={namespace if namespace.startswith('/') else '/' + namespace}"]
    for i, entry in enumerate(kw.get("parameters", [])):
        if isinstance(entry, Mapping):
            params = {name: _parameter(value, values) for name, value in entry.items()}
            path = scratch / f"launch_params_{i}.yaml"
            path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
            command += ["--params-file", str(path)]
        else:
            command += ["--params-file", _substitute(entry, values)]
    for source, target in kw.get("remappings", []):
        command += ["-r", f"{_substitute(source, values)}:={_substitute(target, values)}"]
    return command
