"""Static checks of the Slicer module, which cannot be imported outside Slicer (qt, ctk): the
.ui and the module source (read with ``ast``) agree, and the Qt-free layer stays Qt-free."""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ElementTree

from slicer_support import MODULE_DIR, engine

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
    assert len(selectors) == 7 and selectors <= receivers


def test_panel_enums_are_the_engine_options() -> None:
    def values(name: str) -> tuple[str, ...]:
        return tuple(
            node.value.value
            for node in module_class(name).body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        )

    assert values("Device") == engine.DEVICES
    assert values("InitialAlignment") == engine.INITIAL_ALIGNMENTS


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
    allowed = {"numpy", "slicer", "vtk"} | set(sys.stdlib_module_names)
    for path in sorted((MODULE_DIR / "EquivariantRegistrationLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name in allowed or name.split(".")[0] in allowed - {"slicer"}, (
                    f"{path.name} imports {name}"
                )
