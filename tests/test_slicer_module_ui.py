"""Static checks of the Slicer module, which cannot be imported outside Slicer (qt, ctk): the
.ui and the module source (read with ``ast``) agree, and the Qt-free layer stays Qt-free."""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ElementTree

from slicer_support import MODULE_DIR, engine

from equireg.options import RUN_OPTIONS

UI_FILE = MODULE_DIR / "Resources" / "UI" / "EquivariantRegistration.ui"
MODULE_FILE = MODULE_DIR / "EquivariantRegistration.py"
UI = ElementTree.parse(UI_FILE).getroot()
MODULE = ast.parse(MODULE_FILE.read_text())
WIDGETS = {widget.get("name"): widget for widget in UI.iter("widget")}


def parameter_of(widget: ElementTree.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


BINDINGS = {name: parameter_of(w) for name, w in WIDGETS.items() if parameter_of(w)}


def module_class(name: str) -> ast.ClassDef:
    return next(n for n in MODULE.body if isinstance(n, ast.ClassDef) and n.name == name)


def parameter_fields() -> dict[str, str]:
    """Field name → annotation source of the ``@parameterNodeWrapper`` class."""
    wrapper = next(
        node
        for node in MODULE.body
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    )
    return {
        node.target.id: ast.unparse(node.annotation)
        for node in wrapper.body
        if isinstance(node, ast.AnnAssign)
    }


def test_every_widget_the_code_uses_exists_in_the_ui() -> None:
    used = {
        node.attr
        for node in ast.walk(MODULE)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
    }
    assert {"applyButton", "progressBar", "logTextEdit", "deviceComboBox"} <= used
    assert used <= set(WIDGETS), used - set(WIDGETS)


def test_ui_bindings_and_parameter_node_fields_match_one_to_one() -> None:
    parameters = list(BINDINGS.values())
    assert len(parameters) == len(set(parameters))
    assert sorted(parameters) == sorted(parameter_fields())


def test_each_bound_widget_has_a_connector_for_its_type() -> None:
    """Slicer's GUI connectors match the exact widget class to the parameter's type."""
    fields = parameter_fields()
    for name, parameter in BINDINGS.items():
        annotation, widget_class = fields[parameter], WIDGETS[name].get("class")
        if annotation.startswith("slicer.vtkMRML"):
            assert widget_class == "qMRMLNodeComboBox", name
            types = [s.text for s in WIDGETS[name].iter("string") if s.text.startswith("vtkMRML")]
            assert types == [annotation.removeprefix("slicer.")], name
        elif annotation == "bool":
            assert widget_class == "QCheckBox", name
        elif "int" in annotation:
            assert widget_class == "QSpinBox", name
        else:  # enums and Choice strings
            assert widget_class == "QComboBox", name


def test_every_node_selector_receives_the_scene() -> None:
    receivers = {
        connection.findtext("receiver")
        for connection in UI.iter("connection")
        if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    selectors = {n for n, w in WIDGETS.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert len(selectors) == 8 and selectors <= receivers


def test_panel_enums_are_the_engine_options() -> None:
    def values(name: str) -> tuple[str, ...]:
        return tuple(
            node.value.value
            for node in module_class(name).body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        )

    assert values("Device") == engine.DEVICES
    assert values("InitialAlignment") == engine.INITIAL_ALIGNMENTS
    assert parameter_fields()["initial"] == "InitialAlignment"


def camel_case(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def test_every_run_option_has_a_parameter_and_a_widget() -> None:
    """Adding an option to ``equireg.options.RUN_OPTIONS`` needs its parameter-node field (the
    option's name in camel case, read by ``runOptions``) and a bound widget in the .ui."""
    fields, bound = parameter_fields(), set(BINDINGS.values())
    for option in RUN_OPTIONS:
        name = camel_case(option.name)
        assert name in fields and name in bound, f"{option.name}: no field {name} or no widget"
        if option.flag_only:
            assert fields[name] == "bool", name
    source = ast.unparse(module_class("EquivariantRegistrationLogic"))
    assert "for option in RUN_OPTIONS" in source and "camelCase(option.name)" in source


def test_choice_fields_offer_the_registry_choices() -> None:
    """String options with choices in the registry take them from it (``initial`` is the
    ``InitialAlignment`` enum, compared with the registry below)."""
    fields = parameter_fields()
    for option in RUN_OPTIONS:
        if option.choices and option.name != "initial":
            annotation = fields[camel_case(option.name)]
            assert f"_choices({option.name!r})" in annotation, (option.name, annotation)


def test_output_transform_selectors_offer_grid_transforms_only() -> None:
    """What Slicer's transform reader makes of a displacement-field file; linear and B-spline
    nodes are not offered."""
    fields = parameter_fields()
    for name in ("outputTransform", "outputInverseTransform"):
        assert fields[name] == "slicer.vtkMRMLGridTransformNode"
        widget = next(w for w in WIDGETS.values() if parameter_of(w) == name)
        show_children = next(
            prop for prop in widget.findall("property") if prop.get("name") == "showChildNodeTypes"
        )
        assert show_children.findtext("bool") == "false"


def test_dependencies_are_checked_by_every_start() -> None:
    """The console's ``logic.start`` and ``logic.register`` check (and install) dependencies,
    not only the panel's Apply."""
    logic = module_class("EquivariantRegistrationLogic")
    start = next(n for n in logic.body if getattr(n, "name", "") == "start")
    calls = [ast.unparse(n.func) for n in ast.walk(start) if isinstance(n, ast.Call)]
    assert calls.index("self.ensureDependencies") < calls.index("run.start")


def test_module_never_imports_torch() -> None:
    """Slicer's GUI process must not load torch: CUDA is probed in a background process."""
    sources = [MODULE_FILE, *sorted((MODULE_DIR / "EquivariantRegistrationLib").glob("*.py"))]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "torch" for name in names), path.name


def test_self_test_covers_2d_and_3d_cases_and_skips_without_torch() -> None:
    test = module_class("EquivariantRegistrationTest")
    methods = {n.name for n in test.body if isinstance(n, ast.FunctionDef)}
    assert {"test_LogicRegisters2DCase", "test_LogicRegisters3DCase"} <= methods
    source = ast.unparse(test)
    assert "self.skipTest" in source and "testingEnabled" in source
    assert "self.fail" in source  # a run past the time limit fails explicitly


def test_sample_data_is_registered_with_the_bridges_arguments() -> None:
    """``registerSampleData`` passes exactly what ``sample_data_sources`` returns (tested
    against Slicer's signature in test_slicer_bridge.py) and nothing else."""
    function = next(
        n for n in MODULE.body if isinstance(n, ast.FunctionDef) and n.name == "registerSampleData"
    )
    calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
    register = next(
        c for c in calls if ast.unparse(c.func).endswith("registerCustomSampleDataSource")
    )
    assert not register.args and [k.arg for k in register.keywords] == [None]  # **source only
    assert any(ast.unparse(c.func) == "sample_data_sources" for c in calls)


def test_module_has_the_four_scripted_module_classes() -> None:
    bases = {
        node.name: {ast.unparse(base) for base in node.bases}
        for node in MODULE.body
        if isinstance(node, ast.ClassDef)
    }
    assert "ScriptedLoadableModule" in bases["EquivariantRegistration"]
    assert "ScriptedLoadableModuleWidget" in bases["EquivariantRegistrationWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["EquivariantRegistrationLogic"]
    assert "ScriptedLoadableModuleTest" in bases["EquivariantRegistrationTest"]
    logic = {
        n.name for n in module_class("EquivariantRegistrationLogic").body if hasattr(n, "name")
    }
    assert {"register", "start", "ensureDependencies"} <= logic


def test_module_installs_nothing_at_import() -> None:
    """Module-level code only defines things; installing happens in ensureDependencies."""
    for node in MODULE.body[1:]:  # after the docstring
        assert not isinstance(node, ast.Expr | ast.If | ast.For | ast.With | ast.Try), ast.unparse(
            node
        )[:80]


def test_qt_free_layer_imports_no_gui() -> None:
    """Only MRML, VTK, numpy, the standard library and the engine's standard-library registry
    of run options (``equireg.options``)."""
    allowed = {"numpy", "slicer", "vtk", "equireg.options"} | set(sys.stdlib_module_names)
    for path in sorted((MODULE_DIR / "EquivariantRegistrationLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name in allowed or name.split(".")[0] in allowed - {"slicer", "equireg"}, (
                    f"{path.name} imports {name}"
                )
