"""The benchmark scripts' own logic (no peer runs): tables, scaling rows, 3-D handling."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a script of benchmarks/ by name (they import ``common`` as a sibling)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        return importlib.import_module(name)

    yield load
    for name in ("common", "registration", "scaling", "run_all"):
        sys.modules.pop(name, None)


def test_bench_markdown_table_aligns_numbers_right(bench) -> None:
    table = bench("common").markdown_table(["name", "case", "value"], [["a", "b", 1.5]], 2)
    assert table == "| name | case | value |\n|---|---|---:|\n| a | b | 1.5 |"


def test_bench_scaling_rows_show_linearity_and_sizes_left_out(bench, monkeypatch) -> None:
    scaling = bench("scaling")
    # Memory 100 MB + 64 bytes per voxel, time growing with the edge.
    fake = {"peak_mb": lambda e: 100 + 64 * e**3 / 2**20, "seconds": lambda e: e / 2}

    def register_once(folder, edge, model, device, options):
        return {key: value(edge) for key, value in fake.items()}

    monkeypatch.setattr(scaling, "register_once", register_once)
    monkeypatch.setattr(scaling, "native_card", lambda folder, edge: folder / "card.json")
    rows = scaling.measure([64, 96, 128, 160], "cpu", time_limit=50.0)
    native = [r for r in rows if r["series"] == "native"]
    assert [r["edge"] for r in native] == [64, 96, 128, 160]
    assert "peak_mb" not in native[-1] and "took over 50 s" in native[-1]["error"]
    slopes = scaling.added_per_voxel(rows)
    assert slopes[0] is None and slopes[3] is None  # first size; the size left out
    assert np.allclose([s for s in slopes if s is not None], 64.0)


def test_bench_run_all_scaling_edges(bench) -> None:
    run_all = bench("run_all")
    options = dict(model=[], unet=None, air=None, peers_only=False, bench_cases=False)
    quick = run_all.commands(run_all.argparse.Namespace(quick=True, **options))
    full = run_all.commands(run_all.argparse.Namespace(quick=False, **options))
    assert quick["scaling"][-2:] == ["--max-edge", "128"]
    assert full["scaling"][-2:] == ["--max-edge", "256"]
    assert 256 in bench("scaling").EDGES


def test_bench_peers_get_ct_in_its_window_and_2d_as_stored(bench, tmp_path) -> None:
    registration = bench("registration")
    values = np.linspace(-3024, 1500, 4 * 5 * 6).reshape(4, 5, 6).astype(np.int16)
    paths = []
    for name in ("fixed", "moving"):
        paths.append(tmp_path / f"{name}.nrrd")
        sitk.WriteImage(sitk.GetImageFromArray(values), str(paths[-1]))
    fixed, moving = registration.peer_inputs(*paths, tmp_path)
    clipped = sitk.GetArrayFromImage(sitk.ReadImage(str(fixed)))
    low, high = registration.PEER_CT_WINDOW_HU
    assert clipped.min() == low and clipped.max() == high and moving != paths[1]
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values[0].astype(np.float32)), str(flat))
    assert registration.peer_inputs(flat, flat, tmp_path) == (flat, flat)


def test_bench_models_of_another_dimension_are_named_not_run(bench) -> None:
    registration = bench("registration")
    card = Path(registration.read_card("retina2d").path)
    dims = registration.model_dims({"unet-only": str(card)})
    assert dims == {"unet-only (cpu)": 2}
    note = registration.skipped_note({"unet-only (cpu)": ["lung/chest/plain"]}, dims)
    assert "unet-only (cpu): not run on lung/chest/plain: a 2-D model" in note
    assert registration.skipped_note({}, dims) == ""
