"""The Slicer extension's packaging: every file the module needs is listed in CMake (a file
left out would be missing from the installed extension), the metadata agree, and the engine
imports nothing that Slicer lacks and the module would not install."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

from PIL import Image
from slicer_support import MODULE_DIR, ROOT, engine

MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TESTING_CMAKE = ROOT / "Testing" / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
CATALOG_ENTRY = ROOT / "ExtensionsIndex" / "EquivariantRegistration.json"
# Keys of Slicer's extension catalog entry schema v1.0.1 (additionalProperties: false).
CATALOG_KEYS = {
    "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
    "build_subdirectory", "enabled", "tier",
}  # fmt: skip
SLICER_BUNDLES = {"numpy", "SimpleITK"}  # Python packages every Slicer ships
# Imported only by terminal commands, never by `equireg register --progress json` (Slicer's
# run): matplotlib by `equireg demo`, tqdm by `--progress bar` and `equireg train`.
TERMINAL_ONLY = {"matplotlib", "tqdm"}


def cmake_list(path: Path, variable: str) -> list[str]:
    """The items of ``set(VARIABLE ...)`` in a CMake file, ``${MODULE_NAME}`` expanded."""
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", path.read_text(), re.DOTALL)
    assert match, f"{path}: set({variable} ...) not found"
    return [item.replace("${MODULE_NAME}", "EquivariantRegistration") for item in match[1].split()]


def cmake_value(variable: str) -> str:
    """The value of ``set(VARIABLE ...)`` in the top-level CMakeLists.txt, with the
    ``${...}`` of variables set there (and of ``string(REPLACE ...)``) expanded."""
    text = TOP_CMAKE.read_text()
    match = re.search(rf'set\({variable}\s+"?([^")\n]*)"?\)', text)
    if match is None:  # string(REPLACE "from" "to" VARIABLE "input")
        replace = re.search(rf'string\(REPLACE "([^"]*)" "([^"]*)"\s+{variable} "([^"]*)"\)', text)
        assert replace, f"{TOP_CMAKE}: set({variable} ...) not found"
        return expand(replace[3]).replace(replace[1], replace[2])
    return expand(match[1].strip())


def expand(value: str) -> str:
    """``${NAME}`` replaced by NAME's value where this file sets NAME (others are CMake's)."""
    text = TOP_CMAKE.read_text()

    def value_of(match: re.Match) -> str:
        defined = re.search(rf"(set\(|REPLACE .*\s+){match[1]}\s", text)
        return cmake_value(match[1]) if defined else match[0]

    return re.sub(r"\$\{(\w+)\}", value_of, value)


def module_files(pattern: str) -> set[str]:
    return {
        path.relative_to(MODULE_DIR).as_posix()
        for path in MODULE_DIR.rglob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_every_python_file_of_the_module_folder_is_listed() -> None:
    listed = cmake_list(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS")
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(module_files("*.py"))


def test_every_other_file_the_module_ships_is_listed() -> None:
    """The UI, the icon, and everything in the engine package that is not Python (weights
    and model cards)."""
    listed = cmake_list(MODULE_CMAKE, "MODULE_PYTHON_RESOURCES")
    needed = {
        path
        for path in module_files("*")
        if path.startswith(("Resources/", "equireg/")) and not path.endswith((".py", ".pyc"))
    }
    assert {"equireg/models/retina2d.pt", "equireg/models/retina2d.json"} <= needed
    assert sorted(listed) == sorted(needed)


def test_every_regression_case_is_installed_complete() -> None:
    testing = ROOT / "Testing"
    cases = cmake_list(TESTING_CMAKE, "REGRESSION_CASES")
    anatomies = cmake_list(TESTING_CMAKE, "REGRESSION_ANATOMIES")
    on_disk = {path.parent.relative_to(testing).as_posix() for path in testing.rglob("fixed.nrrd")}
    assert sorted(cases) == sorted(on_disk)
    assert sorted(anatomies) == sorted({case.split("/")[0] for case in cases})
    for anatomy in anatomies:
        assert (testing / anatomy / "expected.json").is_file(), f"Testing/{anatomy}/expected.json"
    for case in cases:
        for name in cmake_list(TESTING_CMAKE, "REGRESSION_CASE_FILES"):
            assert (testing / case / name).is_file(), f"Testing/{case}/{name}"

    module = ast.parse((MODULE_DIR / "EquivariantRegistration.py").read_text())
    offered = next(
        ast.literal_eval(node.value)
        for node in module.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "REGRESSION_CASES"
    )
    assert set(offered) <= set(cases)  # the sample data and the self-test's case are installed


def test_extension_metadata_and_catalog_entry_agree() -> None:
    text = TOP_CMAKE.read_text()
    for line in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(EquivariantRegistration)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert line in text
    for variable in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert cmake_value(variable)
    homepage = cmake_value("EXTENSION_HOMEPAGE")
    assert homepage == cmake_value("EXTENSION_REPOSITORY_URL")
    # The repository URL is written once in CMake; every other CMake URL derives from it.
    assert text.count(homepage.removeprefix("https://github.com/")) == 1
    assert cmake_value("EXTENSION_DEPENDS").split("#")[0].split() == ["PyTorch"]
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = cmake_value(variable)  # raw URLs of files in this repository, on main
        assert url.startswith(homepage.replace("github.com", "raw.githubusercontent.com"))
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url

    entry = json.loads(CATALOG_ENTRY.read_text())
    assert set(entry) <= CATALOG_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert "catalog-entry-schema-v1.0.1" in entry["$schema"]
    assert entry["category"] == cmake_value("EXTENSION_CATEGORY") == "Registration"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"] == homepage

    module = ast.parse((MODULE_DIR / "EquivariantRegistration.py").read_text())
    constants = {
        node.targets[0].id: node.value.value
        for node in module.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    assert constants["HOMEPAGE"] == homepage


def test_license_file_is_apache_2_and_packaged() -> None:
    """The Extensions Index requires a license file at the root; CPack shows
    EXTENSION_LICENSE_FILE (Slicer's own license when unset, hence set before Slicer_USE_FILE)."""
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert re.search(r"^license\s*=\s*.*Apache-2\.0", (ROOT / "pyproject.toml").read_text(), re.M)
    assert cmake_value("EXTENSION_LICENSE_FILE") == "${CMAKE_CURRENT_SOURCE_DIR}/LICENSE"
    text = TOP_CMAKE.read_text()
    assert text.index("set(EXTENSION_LICENSE_FILE") < text.index("include(${Slicer_USE_FILE})")


def test_minimum_slicer_version_is_declared_everywhere() -> None:
    """Slicer 5.10: in CMake (checked at configure time), the description, the module's help
    text and the user guide; the CMake minimum is 5.10's extension template's."""
    minimum = cmake_value("EXTENSION_MINIMUM_SLICER_VERSION")
    assert minimum == "5.10"
    assert f"Slicer {minimum} or later" in cmake_value("EXTENSION_DESCRIPTION")
    module = ast.parse((MODULE_DIR / "EquivariantRegistration.py").read_text())
    constants = {
        ast.unparse(node.targets[0]): node.value.value
        for node in module.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    assert constants["MINIMUM_SLICER_VERSION"] == minimum
    assert "MINIMUM_SLICER_VERSION" in ast.unparse(module_class(module, "EquivariantRegistration"))
    assert f"Slicer {minimum} or later" in (ROOT / "docs" / "slicer.md").read_text()
    first = TOP_CMAKE.read_text().splitlines()[0]
    assert first == "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)"


def module_class(module: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_module_and_engine_parse_as_python_3_12() -> None:
    """Slicer 5.10 runs Python 3.12: no newer syntax in anything the extension installs."""
    for path in sorted(MODULE_DIR.rglob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 12))


def test_register_path_imports_no_tqdm() -> None:
    """Slicer bundles no tqdm: the command line and ``register`` load without it (it is
    imported only for ``--progress bar`` and ``train``)."""
    code = (
        "import sys; sys.modules['tqdm'] = None\n"  # any `import tqdm` now raises ImportError
        "import equireg.cli, equireg.api, equireg.outputs\n"
        "equireg.cli.build_parser().parse_args(['register', 'f', 'm', '-o', 'o'])\n"
        "callback, close = equireg.cli._progress_printer('json'); close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_icons_are_128_pixel_pngs() -> None:
    for path in (
        ROOT / "Resources" / "EquivariantRegistration.png",
        MODULE_DIR / "Resources" / "Icons" / "EquivariantRegistration.png",
    ):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)


def test_module_installs_what_the_engine_needs_beyond_slicer() -> None:
    """``ENGINE_REQUIREMENTS`` (installed on demand in Slicer) plus what Slicer bundles cover
    the engine's dependencies, with the same version constraints as pyproject.toml."""
    declared = {
        re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]: requirement
        for requirement in requires("equireg") or []
        if "extra ==" not in requirement
    }
    assert set(declared) - SLICER_BUNDLES - TERMINAL_ONLY == set(engine.ENGINE_REQUIREMENTS)
    for name, requirement in engine.ENGINE_REQUIREMENTS.items():
        assert declared[name].replace(" ", "") == requirement

    allowed = SLICER_BUNDLES | set(engine.ENGINE_REQUIREMENTS) | set(sys.stdlib_module_names)
    for path in sorted((MODULE_DIR / "equireg").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level: runs on import
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name} at load time"
