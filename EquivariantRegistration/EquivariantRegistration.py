"""EquivariantRegistration: the 3D Slicer module (metadata, panel, logic, self-test).

Thin on purpose: the registration runs in the ``equireg`` engine, launched as a background
process, and everything that does not need Qt (export, command line, import into nodes) lives
in ``EquivariantRegistrationLib``, where pytest covers it with PyPI ``slicer-core``.

No ``from __future__ import annotations`` here: ``parameterNodeWrapper`` reads the annotations
of its class, and Slicer's Python (3.12) evaluates the ``X | None`` hints natively.
"""

import enum
import hashlib
import importlib.util
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import qt
import slicer
import vtk
from EquivariantRegistrationLib.engine import ENGINE_REQUIREMENTS, Options, ProgressEvent
from EquivariantRegistrationLib.mrml_bridge import (
    Outputs,
    Registration,
    bundled_models,
    find_regression_case,
    landmark_errors,
    read_landmarks,
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

MODULE_DIR = Path(__file__).resolve().parent
HOMEPAGE = "https://github.com/OWNER/SlicerEquivariantRegistration"
GUIDE_URL = f"{HOMEPAGE}/blob/main/docs/slicer.md"
# Regression cases offered as sample data (Testing/<anatomy>/<case>/): description.
REGRESSION_CASES = {
    "retina/photo": "Retina photograph (2-D)",
    "retina/vessels": "Retina vessel map (2-D)",
    "lung/chest": "Chest CT, breathing (3-D)",
}
SELFTEST_CASE = "retina/photo"


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
            f'warped moving volume. See the <a href="{GUIDE_URL}">user guide</a>.'
        )
        self.parent.acknowledgementText = (
            "The network follows the published design of equivariant registration: function "
            "inversion by attention, then multi-step refinement. PyTorch is provided by the "
            "SlicerPyTorch extension."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offer the regression cases in the Sample Data module (copied from the module folder):
    fixed, moving, and the moving image shifted far inside its field of view."""
    import SampleData

    icon = str(MODULE_DIR / "Resources" / "Icons" / "EquivariantRegistration.png")
    for name, description in REGRESSION_CASES.items():
        case = find_regression_case(MODULE_DIR, name)
        if case is None:
            continue
        files = [case / f"{stem}.nrrd" for stem in ("fixed", "moving", "moving_shifted")]
        label = name.replace("/", " ")
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="Equivariant Registration",
            sampleName="EquivariantRegistration" + label.title().replace(" ", ""),
            sampleDescription=description,
            thumbnailFileName=icon,
            uris=[path.as_uri() for path in files],
            fileNames=[
                f"EquivariantRegistration-{label.replace(' ', '-')}-{p.name}" for p in files
            ],
            nodeNames=[f"{label} {path.stem.replace('_', ' ')}" for path in files],
            checksums=[f"SHA256:{hashlib.sha256(path.read_bytes()).hexdigest()}" for path in files],
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


@parameterNodeWrapper
class EquivariantRegistrationParameterNode:
    """The panel's state, kept in the scene so that it survives saving and reloading.

    Output nodes left empty are created by the run.
    """

    fixedVolume: slicer.vtkMRMLScalarVolumeNode
    movingVolume: slicer.vtkMRMLScalarVolumeNode
    fixedMask: slicer.vtkMRMLScalarVolumeNode
    movingMask: slicer.vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(bundled_models(MODULE_DIR))] = "auto"
    device: Device = Device.AUTO
    initialAlignment: InitialAlignment = InitialAlignment.NONE
    # -1 shows as "model default": the number of refinement steps the model card recommends.
    refineSteps: Annotated[int, WithinRange(-1, 1000)] = -1
    outputTransform: slicer.vtkMRMLTransformNode
    outputDisplacement: slicer.vtkMRMLVectorVolumeNode
    outputWarped: slicer.vtkMRMLScalarVolumeNode
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
        self._started = 0.0
        self._timer = qt.QTimer()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EquivariantRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EquivariantRegistrationLogic()

        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancel()
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
        available = self.logic.cudaAvailable()
        item = self.ui.deviceComboBox.model().item(list(Device).index(Device.GPU))
        item.setEnabled(available)
        item.setToolTip("" if available else "PyTorch sees no CUDA GPU on this computer")
        if not available and self._parameterNode.device == Device.GPU:
            self._parameterNode.device = Device.AUTO

    def _checkCanApply(self, caller: Any = None, event: Any = None) -> None:
        if self._run is not None or self._parameterNode is None:
            return  # while running the button is Cancel
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
        with slicer.util.tryWithErrorDisplay("Cannot start the registration.", waitCursor=True):
            self.logic.ensureDependencies()
            self._offerGpuOnlyWhenPresent()
            self.ui.logTextEdit.clear()
            self._run = self.logic.startFromParameterNode(self._parameterNode)
            self._started = time.monotonic()
            self._log(" ".join(self._run.command))
            self._setRunning(True)
            self._timer.start()

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
        report = outputs.report
        before = report.get("similarity_before", {}).get("lncc")
        after = report.get("similarity_after", {}).get("lncc")
        self._log(
            f"Done in {seconds:.1f} s on {report.get('device', '?')}; LNCC {before} → {after}"
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


class EquivariantRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration without the panel: used by the widget, the Python console and scripts.

    Console example::

        logic = slicer.util.getModuleLogic("EquivariantRegistration")
        outputs = logic.register(fixedNode, movingNode, device="cpu", refine_steps=50)
        movingNode.SetAndObserveTransformNodeID(outputs.transform.GetID())
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._cuda: bool | None = None

    def getParameterNode(self) -> EquivariantRegistrationParameterNode:
        return EquivariantRegistrationParameterNode(super().getParameterNode())

    def cudaAvailable(self) -> bool:
        """Whether PyTorch, if installed, sees a CUDA GPU (checked once; installs nothing)."""
        if self._cuda is None:
            if importlib.util.find_spec("torch") is None:
                self._cuda = False
            else:
                import torch

                self._cuda = bool(torch.cuda.is_available())
        return self._cuda

    def ensureDependencies(self) -> None:
        """Install what the engine needs after one confirmation: PyTorch through the
        SlicerPyTorch extension (the build that fits this computer), the rest with pip."""
        testing = slicer.app.testingEnabled()
        missing = [
            requirement
            for name, requirement in ENGINE_REQUIREMENTS.items()
            if name != "torch" and importlib.util.find_spec(name) is None
        ]
        if missing:
            question = f"Equivariant Registration needs {', '.join(missing)}. Install now?"
            if not testing and not slicer.util.confirmOkCancelDisplay(question):
                raise RuntimeError(f"{', '.join(missing)} is required and was not installed.")
            slicer.util.pip_install(missing)
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    "PyTorch is needed: install the PyTorch extension from the Extensions "
                    "Manager and restart Slicer."
                ) from None
            version = ENGINE_REQUIREMENTS["torch"].removeprefix("torch")
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=version
            )
            if torch is None:
                raise RuntimeError("PyTorch is required and was not installed.")
            self._cuda = None

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
        model: str = "auto",
        device: str = "auto",
        initial: str = "none",
        refine_steps: int | None = None,
        fixed_mask: slicer.vtkMRMLScalarVolumeNode | None = None,
        moving_mask: slicer.vtkMRMLScalarVolumeNode | None = None,
        transform: slicer.vtkMRMLTransformNode | None = None,
        displacement: slicer.vtkMRMLVectorVolumeNode | None = None,
        warped: slicer.vtkMRMLScalarVolumeNode | None = None,
        keep_files: bool = False,
    ) -> Registration:
        """Export the inputs and launch the engine in the background; returns at once."""
        run = Registration(
            fixed,
            moving,
            python=self.pythonExecutable(),
            module_dir=MODULE_DIR,
            work_root=Path(slicer.app.temporaryPath),
            options=Options(model, device, initial, refine_steps),
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            transform=transform,
            displacement=displacement,
            warped=warped,
            keep_files=keep_files,
        )
        run.start()
        return run

    def startFromParameterNode(self, p: EquivariantRegistrationParameterNode) -> Registration:
        return self.start(
            p.fixedVolume,
            p.movingVolume,
            model=p.model,
            device=p.device.value,
            initial=p.initialAlignment.value,
            refine_steps=p.refineSteps if p.refineSteps >= 0 else None,
            fixed_mask=p.fixedMask,
            moving_mask=p.movingMask,
            transform=p.outputTransform,
            displacement=p.outputDisplacement,
            warped=p.outputWarped,
            keep_files=p.keepTemporaryFiles,
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
        self.ensureDependencies()
        return self.start(fixed, moving, **options).wait(on_event=self._logEvent)

    @staticmethod
    def _logEvent(event: ProgressEvent) -> None:
        if event.stage != "done":
            print(f"[{event.stage}] {event.message}")


class EquivariantRegistrationTest(ScriptedLoadableModuleTest):
    """Runs a retina regression case on the CPU, through the logic and through the panel."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_LogicRegistersRetinaCase()
        self.setUp()
        self.test_PanelRunsAndCancels()

    def _loadCase(self) -> tuple[Path, Any, Any]:
        case = find_regression_case(MODULE_DIR, SELFTEST_CASE)
        self.assertIsNotNone(case, f"regression case {SELFTEST_CASE} is not installed")
        fixed = slicer.util.loadVolume(str(case / "fixed.nrrd"))
        moving = slicer.util.loadVolume(str(case / "moving.nrrd"))
        return case, fixed, moving

    def _assertOnFixedGrid(self, outputs: Outputs, fixed: Any) -> None:
        dimensions = fixed.GetImageData().GetDimensions()
        self.assertEqual(outputs.warped.GetImageData().GetDimensions(), dimensions)
        for a, b in zip(outputs.warped.GetOrigin(), fixed.GetOrigin(), strict=True):
            self.assertAlmostEqual(a, b, places=4)
        self.assertIsNotNone(outputs.displacement.GetImageData())
        self.assertEqual(outputs.transform.GetNodeReferenceID("fixedVolume"), fixed.GetID())

    def test_LogicRegistersRetinaCase(self) -> None:
        self.delayDisplay(f"Registering {SELFTEST_CASE} on the CPU")
        case, fixed, moving = self._loadCase()
        outputs = EquivariantRegistrationLogic().register(fixed, moving, device="cpu")
        self._assertOnFixedGrid(outputs, fixed)
        threshold = selftest_threshold(case)
        if threshold is not None:  # set once the bundled model is trained
            errors = landmark_errors(
                outputs.transform,
                read_landmarks(case / "fixed_landmarks.csv"),
                read_landmarks(case / "moving_landmarks.csv"),
                z=fixed.GetOrigin()[2],
            )
            self.assertLessEqual(float(errors.mean()), threshold)
        self.delayDisplay("Logic test passed")

    def test_PanelRunsAndCancels(self) -> None:
        self.delayDisplay("Running through the panel")
        _, fixed, moving = self._loadCase()
        slicer.util.selectModule("EquivariantRegistration")
        widget = slicer.util.getModuleWidget("EquivariantRegistration")
        parameters = widget.logic.getParameterNode()
        parameters.fixedVolume, parameters.movingVolume = fixed, moving
        parameters.device = Device.CPU
        nodes = slicer.mrmlScene.GetNumberOfNodes()

        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

        widget.ui.applyButton.click()
        deadline = time.monotonic() + 300
        while widget.ui.applyButton.text == "Cancel" and time.monotonic() < deadline:
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
