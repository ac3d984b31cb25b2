"""A merge input that reads the base's own bytes is still an input (zero task vector there).

``B+LORA`` with ``B`` the base reads every tensor the adapter does not touch from the base's
own file: its readers compare equal to the base's. Such a model must keep its place in the
merge (its task vector is zero there), never be folded into the base. The reference is the
same recipe with that model materialised as a copy in another folder (readers that cannot
compare equal), which must give the same bytes.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from streamvec.model.algebra import Source
from streamvec.model.sources import open_source
from streamvec.ops.merge import request_for
from streamvec.ops.merge.method import RunSettings
from tests.adapter_models import save_pair

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("same-bytes")
    base, ft = save_pair("llama", root)
    copy = root / "base-copy"
    shutil.copytree(base, copy)
    return root, base, ft


def _recipe(path: Path, method: str, base: Path, models: list[Path]) -> Path:
    entries = "\n".join(
        f"  - model: {m}\n    parameters:\n      weight: {w}\n      density: 0.6"
        for m, w in zip(models, (0.7, 0.4), strict=False)
    )
    path.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n{entries}\n"
        "parameters:\n  normalize: false\ndtype: float32\n"
    )
    return path


def _load(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(str(f)))
    return out


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_linear"])
def test_model_reading_the_base_bytes_keeps_its_place(
    pair: tuple[Path, Path, Path], method: str
) -> None:
    root, base, ft = pair
    recipe = _recipe(root / f"{method}.yml", method, base, [ft, root / "base-copy"])
    # The reference: the second model is a copy of the base in another folder.
    want_out = root / f"{method}-copy-out"
    request_for(recipe).method.build(request_for(recipe), RunSettings()).save(
        want_out, progress=False, overwrite=True
    )
    # The same recipe with the second model reading the base's own file (what B+LORA does
    # for the tensors the adapter leaves alone).
    req = request_for(recipe)
    opened = open_source(base)
    same = Source("base-bytes", True, "base-bytes", opened.tensors, {}, opened.extra_files)
    req = dataclasses.replace(req, models=(req.models[0], same))
    got_out = root / f"{method}-same-out"
    req.method.build(req, RunSettings()).save(got_out, progress=False, overwrite=True)
    got, want, b, f = _load(got_out), _load(want_out), _load(base), _load(ft)
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    if method == "task_arithmetic":
        # An independent check: base + 0.7 (ft - base) + 0.4 * 0, in float64.
        for name in want:
            ref = b[name].astype(np.float64) + 0.7 * (
                f[name].astype(np.float64) - b[name].astype(np.float64)
            )
            np.testing.assert_allclose(got[name], ref, rtol=2e-7, atol=1e-7, err_msg=name)


def test_naming_is_read_again_when_config_changes(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A base folder whose config.json appears (or is replaced) is not named from a stale cache."""
    from streamvec.io.peft.naming import peft_naming

    _, base, _ = pair
    folder = tmp_path / "base"
    shutil.copytree(base, folder)
    shapes = {n: t.shape for n, t in open_source(folder).tensors.items()}
    config = (folder / "config.json").read_bytes()
    (folder / "config.json").unlink()
    assert peft_naming(folder, shapes).model_class is None  # kinds from names and shapes
    (folder / "config.json").write_bytes(config)
    assert peft_naming(folder, shapes).model_class == "LlamaForCausalLM"
    # Another folder holding the same files is named on its own.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "config.json").unlink()
    assert peft_naming(other, shapes).model_class is None
    assert peft_naming(folder, shapes).model_class == "LlamaForCausalLM"
