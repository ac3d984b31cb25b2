"""Vocabulary changes in the SVD commands: ``merge-svd`` (and recipes' tsv / iso_c) take
``--vocab base|common|union`` as ``combine`` does; ``lora`` takes ``--vocab base`` only.

Inputs are a tied Qwen3 base and a chat fine-tune that added 8 tokens (the ``resized``
fixture of test_real_checkpoints, written by transformers), plus a fine-tune that kept the
base's vocabulary. Outputs are checked against float64 references on whole tensors and loaded
by the real consumers (transformers, PEFT).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.families import read_all
from tests.test_decompose_merge import iso_c_reference, tsv_reference
from tests.test_real_checkpoints import _load_lm, qwen3, resized  # noqa: F401  (fixtures)

EMB = "model.embed_tokens.weight"


def _taus(policy: str, base: dict, fts: list[dict]) -> tuple[list[dict], dict]:
    """The task vectors and the base, restricted or padded as ``policy`` says (float64).

    ``union``: rows an input lacks are the donor's (the first fine-tune that has them), so an
    added token's row has a zero task vector and the base's row is the fine-tune's.
    """
    rows = {"union": max, "base": lambda *_: base[EMB].shape[0], "common": min}[policy](
        *(f[EMB].shape[0] for f in fts)
    )
    donor = next(f for f in fts if f[EMB].shape[0] >= rows)

    def fit(t: dict, name: str) -> np.ndarray:
        x = t[name].astype(np.float64)
        if name != EMB:
            return x
        if x.shape[0] >= rows:
            return x[:rows]
        return np.concatenate([x, donor[name][x.shape[0] : rows].astype(np.float64)])

    b = {n: fit(base, n) for n in base}
    return [{n: fit(f, n) - b[n] for n in base} for f in fts], b


@pytest.mark.parametrize(
    ("method", "policy"),
    [("tsv", "union"), ("tsv", "base"), ("tsv", "common"), ("iso-c", "union")],
)
def test_merge_svd_vocab_policies(
    resized,  # noqa: F811
    qwen3,  # noqa: F811
    tmp_path: Path,
    method: str,
    policy: str,
) -> None:
    out = tmp_path / "out"
    args = ("merge-svd", method, resized["ft"], qwen3["ft2"], "--base", resized["base"])
    assert run_cli(*args, "-o", out, "--alpha", "0.8", "--vocab", policy, "-q") == 0
    base, fts = read_all(resized["base"]), [read_all(resized["ft"]), read_all(qwen3["ft2"])]
    taus, b = _taus(policy, base, fts)
    got = read_all(out)
    rows = 72 if policy == "union" else 64
    assert got[EMB].shape[0] == rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert ("chat" in (out / "tokenizer.json").read_text()) == (policy == "union")
    for name in base:
        per_task = [t[name] for t in taus]
        if per_task[0].ndim < 2:
            merged = np.mean(per_task, axis=0)
        elif method == "tsv":
            merged = tsv_reference(per_task, min(per_task[0].shape))
        else:
            merged = iso_c_reference(per_task, None)
        want = b[name] + 0.8 * merged
        # one rounding to the base's dtype (bfloat16: half an ulp is 2^-8 relative)
        tol = 2.0**-8 if got[name].dtype.itemsize == 2 else 1e-6
        np.testing.assert_allclose(
            got[name].astype(np.float64),
            want,
            rtol=tol,
            atol=1e-5 * np.abs(want).max(),
            err_msg=name,
        )
    if policy == "union":  # added tokens come out as the fine-tune trained them
        np.testing.assert_array_equal(got[EMB][64:], fts[0][EMB][64:])
    model = _load_lm(out)
    assert model.get_input_embeddings().weight.shape[0] == rows  # type: ignore[attr-defined]


def test_merge_recipe_tsv_honours_tokenizer_source(resized, qwen3, tmp_path: Path) -> None:  # noqa: F811
    recipe = tmp_path / "tsv.yaml"
    recipe.write_text(
        f"merge_method: tsv\nbase_model: {resized['base']}\ntokenizer_source: union\n"
        f"parameters: {{lambda: 1.0}}\nmodels:\n  - model: {resized['ft']}\n"
        f"  - model: {qwen3['ft2']}\n"
    )
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    assert "chat" in (out / "tokenizer.json").read_text()
    _load_lm(out)


def test_vocab_refusals_name_a_flag_the_command_takes(resized, tmp_path: Path, capsys) -> None:  # noqa: F811
    """Regression: merge-svd and lora told the user to pass --vocab base, which they refused."""
    for cmd in (
        ("merge-svd", "tsv", resized["ft"], "--base", resized["base"], "-o", tmp_path / "m"),
        ("lora", resized["base"], resized["ft"], "--rank", "2", "-o", tmp_path / "l"),
    ):
        assert run_cli(*cmd, "-q") == 2
        err = capsys.readouterr().err
        assert "--vocab base" in err and err.count("\n") == 1
        if cmd[0] == "lora":  # only the policy lora takes, and the way to a full model
            assert "--vocab common" not in err and "combine --vocab union" in err
        assert run_cli(*cmd, "--vocab", "base", "-q") == 0, cmd


def test_lora_vocab_base_loads_in_peft(resized, tmp_path: Path) -> None:  # noqa: F811
    import peft
    import torch

    out = tmp_path / "adapter"
    rank = 3
    args = ("lora", resized["base"], resized["ft"], "-o", out, "--rank", str(rank), "-q")
    assert run_cli(*args, "--vocab", "base") == 0
    assert "--vocab base" in (out / "README.md").read_text()
    report = json.loads((out / "streamvec_lora.json").read_text())
    assert report["vocab"]["policy"] == "base" and report["vocab"]["rows"] == 64
    base, ft = read_all(resized["base"]), read_all(resized["ft"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_load_lm(resized["base"]), str(out))
    # The update PEFT applies to each wrapped module, from the loaded adapter (float32).
    deltas = {
        name.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default")
        for name, m in model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "r", {})
    }
    assert EMB in deltas and len(deltas) > 1
    for name, delta in deltas.items():
        got = delta.detach().to(torch.float64).numpy()
        tau = ft[name][: base[name].shape[0]].astype(np.float64) - base[name].astype(np.float64)
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        want = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-r update
        assert got.shape == base[name].shape
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(tau).max(), err_msg=name)


@pytest.mark.parametrize("policy", ["union", "common"])
def test_lora_refuses_other_vocab_policies(resized, tmp_path: Path, capsys, policy: str) -> None:  # noqa: F811
    out = tmp_path / "adapter"
    args = ("lora", resized["base"], resized["ft"], "-o", out, "--rank", "2", "--vocab", policy)
    assert run_cli(*args, "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab base" in err and "combine --vocab" in err
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("policy", ["base", "common"])
def test_stats_vocab_policies(
    resized,  # noqa: F811
    qwen3,  # noqa: F811
    policy: str,
) -> None:
    """``stats --vocab`` lines up a resized fine-tune with one that kept the vocabulary."""
    import streamvec as sv

    fts = [read_all(resized["ft"]), read_all(qwen3["ft2"])]
    base = read_all(resized["base"])
    taus, _ = _taus(policy, base, fts)
    st = sv.stats([resized["ft"], qwen3["ft2"]], base=resized["base"], vocab=policy)
    want = np.array([[sum(float(np.sum(a[n] * b[n])) for n in a) for b in taus] for a in taus])
    np.testing.assert_allclose(st.overall.gram[0], want, rtol=1e-10)
    per = dict(zip(st.per_tensor.labels, st.per_tensor.gram, strict=True))
    np.testing.assert_allclose(per[EMB][0, 0], np.sum(taus[0][EMB] ** 2), rtol=1e-10)


def test_stats_vocab_refusals_name_a_flag_stats_takes(resized, qwen3, capsys) -> None:  # noqa: F811
    terms = [resized["ft"], qwen3["ft2"], "--base", resized["base"], "-q"]
    assert run_cli("stats", *terms) == 2
    err = capsys.readouterr().err
    assert "--vocab" in err and err.count("\n") == 1
    assert run_cli("stats", *terms, "--vocab", "union") == 2
    err = capsys.readouterr().err
    assert "--vocab base" in err and err.count("\n") == 1
    assert run_cli("stats", *terms, "--vocab", "base") == 0


def test_api_vocab_from_the_run_settings_is_not_dropped(resized, tmp_path: Path) -> None:  # noqa: F811
    """``svd(..., run=Settings(vocab="base"))``: the run's --vocab is honoured like the keyword."""
    from streamvec.engine.settings import Settings
    from streamvec.ops.svd import SVDOptions, svd

    out = tmp_path / "f"
    run = Settings(vocab="base", progress=False)
    svd(resized["ft"], out, options=SVDOptions(rank=2), base=resized["base"], run=run)
    assert (out / "zarr.json").exists()
