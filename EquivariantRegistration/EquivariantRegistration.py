"""EquivariantRegistration: the 3D Slicer module (metadata, panel, logic, self-test).

Thin on purpose: the registration runs in the ``equireg`` engine, launched as a background
process, and everything that does not need Qt (export, command line, import into nodes) lives
in ``EquivariantRegistrationLib``, where pytest covers it with PyPI ``slicer-core``.

No ``from __future__ import annotations`` here: ``parameterNodeWrapper`` reads the annotations
of its class, and Slicer's Python (3.12) evaluates the ``X | None`` hints natively.
"""

import enum
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import qt
import slicer
import vtk
from EquivariantRegistrationLib.engine import (
    ENGINE_REQUIREMENTS,
    CudaProbe,
    Options,
    ProgressEvent,
    unmet_requirements,
)
from EquivariantRegistrationLib.mrml_bridge import (
    Outputs,
    Registration,
    bundled_models,
    find_regression_case,
    landmark_errors,
    read_landmarks,
    restore_linear_interpolation,
    sample_data_sources,
    selftest_threshold,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from equireg.options import BY_NAME, RUN_OPTIONS

MODULE_DIR = Path(__file__).resolve().parent
# The publisher's repository: EXTENSION_REPOSITORY_URL of the top-level CMakeLists.txt (a
# Python module cannot read CMake; tests/test_slicer_packaging.py checks that they agree).
HOMEPAGE = "https://github.com/OWNER/SlicerEquivariantRegistration"
GUIDE_URL = f"{HOMEPAGE}/blob/main/docs/slicer.md"
MINIMUM_SLICER_VERSION = "5.10"
# Regression cases offered as sample data (Testing/<anatomy>/<case>/): description.
REGRESSION_CASES = {
    "retina/photo": "Retina photograph (2-D)",
    "retina/vessels": "Retina vessel map (2-D)",
    "lung/chest": "Chest CT, breathing (3-D)",
}
# The self-test's cases (a 2-D and a 3-D one) and its limit on one registration's wait.
SELFTEST_2D_CASE, SELFTEST_3D_CASE = "retina/photo", "lung/chest"
SELFTEST_TIMEOUT_S = 600.0


class EquivariantRegistration(ScriptedLoadableModule):
    """Module metadata, and sample data registered once Slicer has started."""

    def __init__(self, parent: Any):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Equivariant Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["EquivariantRegistration contributors"]
        self.parent.helpText = (
            "Registers a moving volume to a fixed volume with a neural network whose result "
            "follows independent translations of both images. Produces a transform (fixed to "
            "moving, usable by ITK, ANTs and elastix), a displacement-field volume and the "
            f"warped moving volume. Requires 3D Slicer {MINIMUM_SLICER_VERSION} or later. "
            f'See the <a href="{GUIDE_URL}">user guide</a>.'
        )
        self.parent.acknowledgementText = (
            "The network follows the published design of equivariant registration: function "
            "inversion by attention, then multi-step refinement. PyTorch is provided by the "
            "SlicerPyTorch extension."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", keepLinearInterpolationOnSceneLoad)


def registerSampleData() -> None:
    """Offer the regression cases in the Sample Data module (copied from the module folder):
    fixed, moving, and the moving image shifted far inside its field of view."""
    import SampleData

    icon = MODULE_DIR / "Resources" / "Icons" / "EquivariantRegistration.png"
    for source in sample_data_sources(MODULE_DIR, REGRESSION_CASES, icon):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


def keepLinearInterpolationOnSceneLoad() -> None:
    """Slicer's transform reader sets cubic interpolation: after a scene is loaded, give this
    module's transform nodes back their linear interpolation (the files' meaning)."""
    slicer.mrmlScene.AddObserver(
        slicer.vtkMRMLScene.EndImportEvent,
        lambda scene, event: restore_linear_interpolation(scene),
    )


class Device(enum.Enum):
    """Where the network runs; ``AUTO`` takes the GPU when PyTorch sees one."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {"auto": "Auto", "cpu": "CPU", "cuda": "GPU (CUDA)"}[self.value]


class InitialAlignment(enum.Enum):
    """The engine's optional linear stage before the network (``--initial``)."""

    NONE = "none"
    TRANSLATION = "translation"
    RIGID = "rigid"
    AFFINE = "affine"

    def label(self) -> str:
        return self.value.capitalize()


def _choices(name: str) -> Choice:
    return Choice(list(BY_NAME[name].choices))


@parameterNodeWrapper
class EquivariantRegistrationParameterNode:
    """The panel's state, kept in the scene so that it survives saving and reloading.

    Each run option of ``equireg.options.RUN_OPTIONS`` has the field of its name in camel case
    (``field_grid`` → ``fieldGrid``), read by ``EquivariantRegistrationLogic.runOptions``.
    Output nodes left empty are created by the run.
    """

    fixedVolume: slicer.vtkMRMLScalarVolumeNode
    movingVolume: slicer.vtkMRMLScalarVolumeNode
    fixedMask: slicer.vtkMRMLScalarVolumeNode
    movingMask: slicer.vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(bundled_models(MODULE_DIR))] = "auto"
    device: Device = Device.AUTO
    initial: InitialAlignment = InitialAlignment.AFFINE
    similarity: Annotated[str, _choices("similarity")] = BY_NAME["similarity"].default
    quality: Annotated[str, _choices("quality")] = BY_NAME["quality"].default
    # -1 shows as "preset": the number of refinement steps the quality preset chooses.
    refineSteps: Annotated[int, WithinRange(-1, 1000)] = -1
    fieldGrid: Annotated[str, _choices("field_grid")] = BY_NAME["field_grid"].default
    inverse: bool = False
    outputTransform: slicer.vtkMRMLGridTransformNode
    outputDisplacement: slicer.vtkMRMLVectorVolumeNode
    outputWarped: slicer.vtkMRMLScalarVolumeNode
    outputInverseTransform: slicer.vtkMRMLGridTransformNode
    keepTemporaryFiles: bool = False


class EquivariantRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node, runs the logic, shows progress."""

    def __init__(self, parent: Any = None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: EquivariantRegistrationLogic | None = None
        self._parameterNode: EquivariantRegistrationParameterNode | None = None
        self._parameterNodeGuiTag: Any = None
        self._run: Registration | None = None
        self._preparing = False  # checking or installing dependencies before a run
        self._started = 0.0
        self._timer = qt.QTimer()
        self._cudaTimer = qt.QTimer()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EquivariantRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EquivariantRegistrationLogic()

        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)
        self._cudaTimer.setInterval(500)
        self._cudaTimer.connect("timeout()", self._offerGpuOnlyWhenPresent)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancel()
        self._cudaTimer.stop()
        self.logic.cancelCudaProbe()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Keep the parameter node (a run may still finish into it); only unbind the widgets.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply
            )

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self._cancel()  # its nodes are about to go
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode: EquivariantRegistrationParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply
            )
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._offerGpuOnlyWhenPresent()
            self._checkCanApply()

    def _offerGpuOnlyWhenPresent(self) -> None:
        """Enable "GPU" once a background probe has found one; torch never loads in Slicer."""
        available = self.logic.cudaAvailable()
        item = self.ui.deviceComboBox.model().item(list(Device).index(Device.GPU))
        if available is None:  # the probe is running: ask again from the timer
            item.setEnabled(False)
            item.setToolTip("Checking whether PyTorch sees a CUDA GPU…")
            self._cudaTimer.start()
            return
        self._cudaTimer.stop()
        item.setEnabled(available)
        item.setToolTip("" if available else "PyTorch sees no CUDA GPU on this computer")
        if not available and self._parameterNode and self._parameterNode.device == Device.GPU:
            self._parameterNode.device = Device.AUTO

    def _checkCanApply(self, caller: Any = None, event: Any = None) -> None:
        if self._run is not None or self._preparing or self._parameterNode is None:
            return  # while running the button is Cancel; while installing it is disabled
        ready = bool(self._parameterNode.fixedVolume and self._parameterNode.movingVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            "Register the moving volume to the fixed volume"
            if ready
            else "Select the fixed and moving volumes"
        )

    def onApplyButton(self) -> None:
        if self._run is not None:
            self._cancel()
            return
        if self._preparing:
            return  # a click queued while PyTorch or pip was installing
        self._preparing = True
        self.ui.applyButton.enabled = False
        self.ui.applyButton.text = "Checking dependencies…"
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay("Cannot start the registration.", waitCursor=True):
                self.ui.logTextEdit.clear()
                self._run = self.logic.startFromParameterNode(self._parameterNode)
                self._started = time.monotonic()
                self._log(" ".join(self._run.command))
                self._setRunning(True)
                self._timer.start()
        finally:
            self._preparing = False
            if self._run is None:
                self._setRunning(False)
            self._offerGpuOnlyWhenPresent()  # PyTorch may just have been installed

    def onTimer(self) -> None:
        for event in self._run.poll():
            self._showEvent(event)
        if not self._run.finished:
            return
        self._timer.stop()
        run, self._run = self._run, None
        self._setRunning(False)
        with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
            try:
                outputs = run.finish()
            finally:
                if run.keep_files:
                    self._log(f"Temporary files kept in {run.folder}")
            self._showOutputs(outputs, time.monotonic() - self._started)

    def _cancel(self) -> None:
        if self._run is None:
            return
        self.ui.applyButton.text = "Cancelling…"
        self.ui.applyButton.enabled = False
        slicer.app.processEvents()
        self._timer.stop()
        run, self._run = self._run, None
        run.cancel()
        self._log("Cancelled.")
        self.ui.statusLabel.text = "Cancelled"
        self._setRunning(False)

    def _setRunning(self, running: bool) -> None:
        for section in (
            self.ui.inputsCollapsibleButton,
            self.ui.optionsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            section.enabled = not running
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = "Stop the registration" if running else ""
        if running:
            self.ui.applyButton.enabled = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting…"
        else:
            self._checkCanApply()

    def _showEvent(self, event: ProgressEvent) -> None:
        if event.stage in ("log", "stderr"):
            self._log(event.message)
        elif event.stage == "warning":
            self._log(f"Warning: {event.message}")
        elif event.stage == "done":
            self.ui.progressBar.value = 100
        else:
            if event.progress is not None:
                self.ui.progressBar.value = int(round(100 * event.progress))
            self.ui.statusLabel.text = event.message
            self._log(f"{event.stage}: {event.message}")

    def _showOutputs(self, outputs: Outputs, seconds: float) -> None:
        parameters = self.logic.getParameterNode()
        parameters.outputTransform = outputs.transform
        parameters.outputDisplacement = outputs.displacement
        parameters.outputWarped = outputs.warped
        if outputs.inverse_transform is not None:
            parameters.outputInverseTransform = outputs.inverse_transform
        report = outputs.report
        for warning in report.get("warnings", []):
            self._log(f"Warning: {warning}")
        # The measure that ran (``auto`` names the one it chose in the refinement's report).
        similarity = report.get("refinement", {}).get("similarity", parameters.similarity)
        before = report.get("similarity_before", {}).get(similarity)
        after = report.get("similarity_after", {}).get(similarity)
        model = report.get("model", {})
        self._log(
            f"Done in {seconds:.1f} s on {report.get('device', '?')}; model "
            f"{model.get('name', '?')} ({model.get('chosen', '?')}); "
            f"{similarity.upper()} {before} → {after}"
        )
        self.ui.statusLabel.text = f"Done in {seconds:.1f} s"
        slicer.util.setSliceViewerLayers(
            background=parameters.fixedVolume,
            foreground=outputs.warped,
            foregroundOpacity=0.5,
            fit=True,
        )

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)


def camelCase(name: str) -> str:
    """``field_grid`` → ``fieldGrid``: a run option's parameter-node field."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


class EquivariantRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration without the panel: used by the widget, the Python console and scripts.

    Console example::

        logic = slicer.util.getModuleLogic("EquivariantRegistration")
        outputs = logic.register(fixedNode, movingNode, device="cpu", quality="fast")
        movingNode.SetAndObserveTransformNodeID(outputs.transform.GetID())
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._cuda: bool | None = None
        self._cudaProbe: CudaProbe | None = None

    def getParameterNode(self) -> EquivariantRegistrationParameterNode:
        return EquivariantRegistrationParameterNode(super().getParameterNode())

    def cudaAvailable(self) -> bool | None:
        """Whether PyTorch sees a CUDA GPU; ``None`` while a background process finds out
        (started by the first call). torch is never imported into Slicer's own process."""
        if self._cuda is not None:
            return self._cuda
        if unmet_requirements({"torch": ENGINE_REQUIREMENTS["torch"]}):
            return False  # asked again after an install
        if self._cudaProbe is None:
            try:
                self._cudaProbe = CudaProbe(self.pythonExecutable())
            except RuntimeError:  # no PythonSlicer: the first run will say so
                return False
        result = self._cudaProbe.result()
        if result is not None:
            self._cuda, self._cudaProbe = result, None
        return result

    def cancelCudaProbe(self) -> None:
        if self._cudaProbe is not None:
            self._cudaProbe.cancel()
            self._cudaProbe = None

    def ensureDependencies(self) -> None:
        """Install what the engine needs, or a newer version of it, after one confirmation:
        PyTorch through the SlicerPyTorch extension (the build that fits this computer), the
        rest with pip. Installs nothing in testing mode (raises instead)."""
        unmet = unmet_requirements()
        if not unmet:
            return
        names = ", ".join(
            f"{ENGINE_REQUIREMENTS[name]} (installed: {version or 'none'})"
            for name, version in unmet.items()
        )
        if slicer.app.testingEnabled():
            raise RuntimeError(f"Equivariant Registration needs {names}; testing installs nothing.")
        others = [ENGINE_REQUIREMENTS[name] for name in unmet if name != "torch"]
        if others:
            question = f"Equivariant Registration needs {', '.join(others)}. Install now?"
            if not slicer.util.confirmOkCancelDisplay(question):
                raise RuntimeError(f"{', '.join(others)} is required and was not installed.")
            slicer.util.pip_install(others)
        if "torch" in unmet:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    "PyTorch is needed: install the PyTorch extension from the Extensions "
                    "Manager and restart Slicer."
                ) from None
            version = ENGINE_REQUIREMENTS["torch"].removeprefix("torch")
            # SlicerPyTorch imports the torch it has just installed; nothing imports it before.
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=version
            )
            if torch is None:
                raise RuntimeError("PyTorch is required and was not installed.")
            self._cuda = None
        still = unmet_requirements()
        if still:
            raise RuntimeError(
                f"{', '.join(ENGINE_REQUIREMENTS[name] for name in still)} is still not "
                "installed; restart Slicer and try again."
            )

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher, which sees the packages installed into Slicer."""
        path = shutil.which("PythonSlicer")
        if path is None:
            raise RuntimeError("PythonSlicer was not found next to the Slicer executable.")
        return path

    def start(
        self,
        fixed: slicer.vtkMRMLScalarVolumeNode,
        moving: slicer.vtkMRMLScalarVolumeNode,
        *,
        fixed_mask: slicer.vtkMRMLScalarVolumeNode | None = None,
        moving_mask: slicer.vtkMRMLScalarVolumeNode | None = None,
        transform: slicer.vtkMRMLTransformNode | None = None,
        displacement: slicer.vtkMRMLVectorVolumeNode | None = None,
        warped: slicer.vtkMRMLScalarVolumeNode | None = None,
        inverse_transform: slicer.vtkMRMLTransformNode | None = None,
        keep_files: bool = False,
        **options: Any,
    ) -> Registration:
        """Check the dependencies (installing after confirmation), export the inputs and launch
        the engine in the background; returns at once.

        ``options`` are the run options of ``equireg.options.RUN_OPTIONS`` by name (``model``,
        ``device``, ``initial``, ``similarity``, ``quality``, ``refine_steps``, ``field_grid``,
        ``inverse``); those not given take the engine's defaults.
        """
        self.ensureDependencies()
        run = Registration(
            fixed,
            moving,
            python=self.pythonExecutable(),
            module_dir=MODULE_DIR,
            work_root=Path(slicer.app.temporaryPath),
            options=Options(**options),
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            transform=transform,
            displacement=displacement,
            warped=warped,
            inverse_transform=inverse_transform,
            keep_files=keep_files,
        )
        run.start()
        return run

    @staticmethod
    def runOptions(p: EquivariantRegistrationParameterNode) -> dict[str, Any]:
        """The run options set in the panel: each option's camel-case field, enums by value,
        -1 for "decided by the engine" (``None``)."""
        options = {}
        for option in RUN_OPTIONS:
            value = getattr(p, camelCase(option.name))
            if isinstance(value, enum.Enum):
                value = value.value
            if option.default is None and value == -1:
                value = None
            options[option.name] = value
        return options

    def startFromParameterNode(self, p: EquivariantRegistrationParameterNode) -> Registration:
        return self.start(
            p.fixedVolume,
            p.movingVolume,
            fixed_mask=p.fixedMask,
            moving_mask=p.movingMask,
            transform=p.outputTransform,
            displacement=p.outputDisplacement,
            warped=p.outputWarped,
            inverse_transform=p.outputInverseTransform,
            keep_files=p.keepTemporaryFiles,
            **self.runOptions(p),
        )

    def register(
        self,
        fixed: slicer.vtkMRMLScalarVolumeNode,
        moving: slicer.vtkMRMLScalarVolumeNode,
        **options: Any,
    ) -> Outputs:
        """Register and wait (blocks Slicer meanwhile); for the console and batch scripts.

        ``options`` are those of ``start``. Returns the output nodes and the engine's report;
        raises ``BridgeError`` with the engine's one-line message when it fails.
        """
        return self.start(fixed, moving, **options).wait(on_event=self._logEvent)

    @staticmethod
    def _logEvent(event: ProgressEvent) -> None:
        if event.stage != "done":
            print(f"[{event.stage}] {event.message}")


class EquivariantRegistrationTest(ScriptedLoadableModuleTest):
    """A 2-D and a 3-D regression case on the CPU through the logic, and the panel's states
    (busy while preparing, Cancel, Apply). Skipped, with the reason, where PyTorch is missing
    in testing mode (the extension factory installs nothing)."""

    def setUp(self) -> None:
        unmet = unmet_requirements()
        if slicer.app.testingEnabled() and unmet:
            needs = ", ".join(ENGINE_REQUIREMENTS[name] for name in unmet)
            self.skipTest(f"Equivariant Registration needs {needs}; testing installs nothing")
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_LogicRegisters2DCase()
        self.setUp()
        self.test_LogicRegisters3DCase()
        self.setUp()
        self.test_LinearInterpolationSurvivesSceneReload()
        self.setUp()
        self.test_PanelIsBusyWhilePreparing()
        self.setUp()
        self.test_PanelRunsAndCancels()

    def _loadCase(self, name: str) -> tuple[Path, Any, Any]:
        case = find_regression_case(MODULE_DIR, name)
        self.assertIsNotNone(case, f"regression case {name} is not installed")
        fixed = slicer.util.loadVolume(str(case / "fixed.nrrd"))
        moving = slicer.util.loadVolume(str(case / "moving.nrrd"))
        return case, fixed, moving

    def _assertOnFixedGrid(self, outputs: Outputs, fixed: Any) -> None:
        dimensions = fixed.GetImageData().GetDimensions()
        self.assertEqual(outputs.warped.GetImageData().GetDimensions(), dimensions)
        for a, b in zip(outputs.warped.GetOrigin(), fixed.GetOrigin(), strict=True):
            self.assertAlmostEqual(a, b, places=4)
        self.assertIsNotNone(outputs.displacement.GetImageData())
        self.assertEqual(
            outputs.transform.GetNodeReferenceID(
                slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
            ),
            fixed.GetID(),
        )

    def _wait(self, run: Registration) -> Outputs:
        """The run's outputs; fails the test when it takes longer than SELFTEST_TIMEOUT_S."""
        deadline = time.monotonic() + SELFTEST_TIMEOUT_S
        while not run.finished:
            if time.monotonic() > deadline:
                run.cancel()
                self.fail(f"the registration took longer than {SELFTEST_TIMEOUT_S:.0f} s")
            run.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        return run.finish()

    def test_LogicRegisters2DCase(self) -> None:
        self._registerCase(SELFTEST_2D_CASE, inverse=False)

    def test_LogicRegisters3DCase(self) -> None:
        self._registerCase(SELFTEST_3D_CASE, inverse=True)

    def _registerCase(self, name: str, inverse: bool) -> None:
        self.delayDisplay(f"Registering {name} on the CPU")
        case, fixed, moving = self._loadCase(name)
        run = EquivariantRegistrationLogic().start(
            fixed, moving, device="cpu", quality="fast", inverse=inverse
        )
        outputs = self._wait(run)
        self._assertOnFixedGrid(outputs, fixed)
        self.assertEqual(outputs.inverse_transform is not None, inverse)
        threshold = selftest_threshold(case)
        if threshold is not None:
            errors = landmark_errors(
                outputs.transform,
                read_landmarks(case / "fixed_landmarks.csv"),
                read_landmarks(case / "moving_landmarks.csv"),
                z=fixed.GetOrigin()[2],
            )
            self.assertLessEqual(float(errors.mean()), threshold)
        self.delayDisplay(f"{name} passed")

    def test_LinearInterpolationSurvivesSceneReload(self) -> None:
        """The module's scene observer undoes the cubic interpolation Slicer's reader sets."""
        self.delayDisplay("Saving and reloading a registration result")
        _, fixed, moving = self._loadCase(SELFTEST_2D_CASE)
        run = EquivariantRegistrationLogic().start(
            fixed, moving, device="cpu", quality="fast", refine_steps=0
        )
        name = self._wait(run).transform.GetName()
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "scene.mrb")
            self.assertTrue(slicer.util.saveScene(path))
            slicer.mrmlScene.Clear()
            slicer.util.loadScene(path)
        grid = slicer.util.getNode(name).GetTransformFromParent()
        self.assertEqual(grid.GetInterpolationMode(), vtk.VTK_LINEAR_INTERPOLATION)

    def test_PanelIsBusyWhilePreparing(self) -> None:
        """While dependencies are checked or installed, Apply is disabled and a second click
        starts nothing."""
        _, fixed, moving = self._loadCase(SELFTEST_2D_CASE)
        slicer.util.selectModule("EquivariantRegistration")
        widget = slicer.util.getModuleWidget("EquivariantRegistration")
        parameters = widget.logic.getParameterNode()
        parameters.fixedVolume, parameters.movingVolume = fixed, moving
        seen = []

        def preparing() -> None:
            seen.append((widget.ui.applyButton.enabled, widget.ui.applyButton.text))
            widget.onApplyButton()  # a click queued meanwhile
            raise RuntimeError("stopped by the self-test")

        widget.logic.ensureDependencies = preparing
        try:
            widget.ui.applyButton.click()
        finally:
            del widget.logic.ensureDependencies
        self.assertEqual(seen, [(False, "Checking dependencies…")])
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertTrue(widget.ui.applyButton.enabled)

    def test_PanelRunsAndCancels(self) -> None:
        self.delayDisplay("Running through the panel")
        _, fixed, moving = self._loadCase(SELFTEST_2D_CASE)
        slicer.util.selectModule("EquivariantRegistration")
        widget = slicer.util.getModuleWidget("EquivariantRegistration")
        parameters = widget.logic.getParameterNode()
        parameters.fixedVolume, parameters.movingVolume = fixed, moving
        parameters.device = Device.CPU
        parameters.quality = "fast"
        nodes = slicer.mrmlScene.GetNumberOfNodes()

        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

        widget.ui.applyButton.click()
        deadline = time.monotonic() + SELFTEST_TIMEOUT_S
        while widget.ui.applyButton.text == "Cancel":
            if time.monotonic() > deadline:
                widget.ui.applyButton.click()
                self.fail(f"the panel's run took longer than {SELFTEST_TIMEOUT_S:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(widget.ui.progressBar.value, 100)
        self._assertOnFixedGrid(
            Outputs(
                parameters.outputTransform, parameters.outputDisplacement, parameters.outputWarped
            ),
            fixed,
        )
        self.delayDisplay("Panel test passed")
