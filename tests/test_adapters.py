"""PEFT LoRA adapter folders as task vectors, and many adapters into one.

Adapters are trained-looking (random A and B, ``init_lora_weights=False``) real PEFT adapters
saved with ``save_pretrained`` on tiny transformers models. References: PEFT's own
``merge_and_unload()`` and float64 numpy on the adapter's factors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

import streamvec as sv
from tests.adapter_models import load, save_pair
from tests.conftest import run_cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _make_adapter(base_dir: Path, out: Path, seed: int, **config: Any) -> Any:
    """Save a PEFT adapter on the model in ``base_dir``; return the merged model's state."""
    torch.manual_seed(seed)
    model = load(base_dir)
    cfg = peft.LoraConfig(init_lora_weights=False, **config)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))  # a trained head: saved whole
    pm.save_pretrained(out)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adapters")
    llama, _ = save_pair("llama", root)
    gpt2, _ = save_pair("gpt2", root)
    vit, _ = save_pair("vit", root)
    found: dict[str, Any] = {"root": root, "llama": llama, "gpt2": gpt2, "vit": vit}
    # rslora, rank_pattern / alpha_pattern, embedding LoRA, modules_to_save.
    found["llama_lora_merged"] = _make_adapter(
        llama,
        root / "llama-lora",
        1,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    # Conv1D: PEFT needs fan_in_fan_out (the update is (B A).T in the stored orientation).
    found["gpt2_lora_merged"] = _make_adapter(
        gpt2,
        root / "gpt2-lora",
        2,
        r=4,
        lora_alpha=4,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj"],
    )
    # Loaded names differ from checkpoint names (transformers 5 converts ViT keys).
    found["vit_lora_merged"] = _make_adapter(
        vit, root / "vit-lora", 3, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]
    )
    for i, targets in enumerate((["q_proj", "v_proj"], ["q_proj", "o_proj"])):
        found[f"llama_ab{i}_merged"] = _make_adapter(
            llama, root / f"llama-ab{i}", 10 + i, r=2 + i, lora_alpha=4, target_modules=targets
        )
    return found


def _loaded_state(path: Path) -> dict[str, Any]:
    return {k: v.detach().double() for k, v in load(path).state_dict().items()}


@pytest.mark.parametrize("which", ["llama", "gpt2", "vit"])
def test_combine_adapter_equals_merge_and_unload(models: dict[str, Any], which: str) -> None:
    out = models["root"] / f"{which}-combined"
    rc = run_cli(
        "combine",
        "--base",
        models[which],
        "-o",
        out,
        f"{models['root'] / f'{which}-lora'}:1",
        "--overwrite",
        "-q",
    )
    assert rc == 0
    got = _loaded_state(out)
    want = models[f"{which}_lora_merged"]
    base = _loaded_state(models[which])
    assert set(got) == set(want)
    eps = float(np.finfo(np.float32).eps)
    for name, w in want.items():
        # PEFT rounds B A to float32 (each element a sum of r products that may cancel) and
        # then W + B A; streamvec rounds the float64 product to float32 and W + tau once.
        # Both are within about two roundings at the tensor's scale of the exact result, so
        # they agree within 4 eps * max(|W|, |W + tau|).
        w64 = w.double()
        scale = max(float(base[name].abs().max()), float(w64.abs().max()))
        diff = float((got[name] - w64).abs().max())
        assert diff <= 4 * eps * scale, (which, name, diff / (eps * scale))
    changed = [n for n in want if not torch.equal(want[n].double(), base[n])]
    assert changed  # the adapter does change the model


def _float64_tau(adapter: Path, module: str, transpose: bool, scale: float) -> np.ndarray:
    w = safetensors.numpy.load_file(str(adapter / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    if f"{key}.lora_embedding_A" in w:
        a, b = w[f"{key}.lora_embedding_A"], w[f"{key}.lora_embedding_B"]
    else:
        a, b = w[f"{key}.lora_A.weight"], w[f"{key}.lora_B.weight"]
    ba = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return ba.T if transpose else ba


def test_scaling_rules_against_float64(models: dict[str, Any]) -> None:
    """rslora alpha/sqrt(r), rank_pattern/alpha_pattern, embedding (B A).T, modules_to_save."""
    adapter = models["root"] / "llama-lora"
    tau = sv.open(adapter, base=models["llama"])
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.0.self_attn.v_proj"
    cases = {
        f"{q}.weight": _float64_tau(adapter, q, False, 3 / math.sqrt(4)),  # alpha_pattern
        f"{v}.weight": _float64_tau(adapter, v, False, 8 / math.sqrt(2)),  # rank_pattern
        "model.embed_tokens.weight": _float64_tau(adapter, "model.embed_tokens", True, 8 / 2),
    }
    for name, want in cases.items():
        got = tau[name].compute()
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7 * np.abs(want).max())
    saved = safetensors.numpy.load_file(str(adapter / "adapter_model.safetensors"))
    base = safetensors.numpy.load_file(str(models["llama"] / "model.safetensors"))
    want = saved["base_model.model.lm_head.weight"].astype(np.float64) - base["lm_head.weight"]
    np.testing.assert_allclose(tau["lm_head.weight"].compute(), want, atol=1e-7)
    # The adapter touches a few tensors; the rest are absent (zero), not missing.
    assert "model.norm.weight" not in tau


def test_adapter_as_input_to_diff_svd_decompose(models: dict[str, Any]) -> None:
    root, base = models["root"], models["llama"]
    a0, a1 = root / "llama-ab0", root / "llama-ab1"
    rc = run_cli("diff", base, a0, "-o", root / "ab0.zarr", "--overwrite", "-q")
    assert rc == 0
    stored = sv.open(root / "ab0.zarr")
    lazy = sv.open(a0, base=base)
    assert set(stored) == set(lazy)
    for name in stored:
        np.testing.assert_array_equal(stored[name].compute(), lazy[name].compute())
    rc = run_cli(
        "svd", a0, "--base", base, "-o", root / "ab0-svd.zarr", "--rank", "2", "--overwrite", "-q"
    )
    assert rc == 0
    svd = sv.open(root / "ab0-svd.zarr")
    for name in stored:  # rank-2 adapter: its rank-2 SVD is exact
        np.testing.assert_allclose(svd[name].compute(), stored[name].compute(), atol=1e-6)
    rc = run_cli(
        "decompose",
        a0,
        a1,
        "--base",
        base,
        "-o",
        root / "parts",
        "--rank",
        "2",
        "--overwrite",
        "-q",
    )
    assert rc == 0


def test_open_without_base(models: dict[str, Any]) -> None:
    """The recorded local base is used; without one, names are the module names, and
    tensors saved whole need a base, which the error says."""
    root = models["root"]
    recorded = json.loads((root / "llama-lora" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(models["llama"])
    assert "lm_head.weight" in sv.open(root / "llama-lora")  # modules_to_save: needs the base
    orphan = _edit_config(root / "llama-lora", root / "orphan", base_model_name_or_path=None)
    with pytest.raises(sv.StreamvecError, match="pass the base"):
        sv.open(orphan)
    plain = _edit_config(root / "llama-ab0", root / "orphan-ab0", base_model_name_or_path=None)
    tau = sv.open(plain)
    assert set(tau) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    }


def _edit_config(src: Path, dst: Path, **changes: Any) -> Path:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias 'all'"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
    ],
)
def test_refused_features_exit_2(
    models: dict[str, Any], changes: dict[str, Any], named: str, capsys: Any
) -> None:
    root = models["root"]
    # The folder name must not contain the feature's name: the message has to say it.
    bad = _edit_config(root / "llama-ab0", root / f"refused-{len(str(changes))}", **changes)
    out = root / "never"
    rc = run_cli("combine", "--base", models["llama"], "-o", out, str(bad))
    assert rc == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_recorded_base_mismatch_warns_or_fails_with_strict(
    models: dict[str, Any], capsys: Any
) -> None:
    root = models["root"]
    other = root / "llama-other"
    import shutil

    shutil.copytree(models["llama"], other, dirs_exist_ok=True)
    adapter = _edit_config(
        root / "llama-ab0", root / "llama-ab0-recorded", base_model_name_or_path=str(other)
    )
    rc = run_cli(
        "lora",
        "--base",
        models["llama"],
        "-o",
        root / "w",
        str(adapter),
        "--rank",
        "2",
        "--overwrite",
        "-q",
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(other) in err and str(models["llama"]) in err
    rc = run_cli(
        "lora",
        "--base",
        models["llama"],
        "-o",
        root / "s",
        str(adapter),
        "--rank",
        "2",
        "--strict",
        "-q",
    )
    assert rc == 2
    assert not (root / "s").exists()


@pytest.mark.parametrize("rank", [5, 2])
def test_many_adapters_into_one(models: dict[str, Any], rank: int) -> None:
    """0.5 a + 0.5 b (ranks 2 and 3) as one adapter: exact at rank >= 5, best rank-2 below."""
    root, base_dir = models["root"], models["llama"]
    out = root / f"merged-{rank}"
    rc = run_cli(
        "lora",
        "--base",
        base_dir,
        "-o",
        out,
        f"{root / 'llama-ab0'}:0.5",
        f"{root / 'llama-ab1'}:0.5",
        "--rank",
        str(rank),
        "--overwrite",
        "-q",
    )
    assert rc == 0
    report = json.loads((out / "streamvec_lora.json").read_text())
    assert {m["method"] for m in report["modules"].values()} <= {"factored (exact)", "factored"}
    base = _loaded_state(base_dir)
    a, b = models["llama_ab0_merged"], models["llama_ab1_merged"]
    model = peft.PeftModel.from_pretrained(load(base_dir), out)
    merged = {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}
    for name, w in merged.items():
        tau = 0.5 * (a[name].double() - base[name]) + 0.5 * (b[name].double() - base[name])
        t = tau.numpy()
        if t.ndim == 2 and np.abs(t).max() > 0:
            u, s, vh = np.linalg.svd(t)
            want = (u[:, :rank] * s[:rank]) @ vh[:rank]
        else:
            want = t
        # The references a, b are PEFT's float32 merges (rounded W + s B A): ~1e-7 noise.
        np.testing.assert_allclose((w - base[name]).numpy(), want, atol=1e-6, err_msg=name)
        if rank == 5 and name.endswith("q_proj.weight"):
            # q_proj holds both adapters (rank 2 + 3): the merged adapter is exact.
            np.testing.assert_allclose((w - base[name]).numpy(), t, atol=1e-6)


def _recipe(path: Path, method: str, base: str, models: list[str], extra: str = "") -> Path:
    entries = "\n".join(
        f"  - model: {m}\n    parameters:\n      weight: 0.5\n      density: 0.7" for m in models
    )
    path.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n{entries}\n"
        f"parameters:\n  normalize: false\n{extra}dtype: float32\n"
    )
    return path


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_adapter_term_in_merge_recipes(models: dict[str, Any], method: str) -> None:
    """``B+LORA`` entries equal the same recipe on the materialised merged checkpoints."""
    root, base = models["root"], models["llama"]
    for i in (0, 1):
        mat = root / f"llama-ab{i}-materialised"
        if not mat.exists():
            model = peft.PeftModel.from_pretrained(load(base), root / f"llama-ab{i}")
            merged = model.merge_and_unload()
            merged.save_pretrained(mat)
    lora_models = [f"{base}+{root / f'llama-ab{i}'}" for i in (0, 1)]
    mat_models = [str(root / f"llama-ab{i}-materialised") for i in (0, 1)]
    r1 = _recipe(root / f"{method}-lora.yml", method, str(base), lora_models)
    r2 = _recipe(root / f"{method}-mat.yml", method, str(base), mat_models)
    assert run_cli("merge", r1, "-o", root / f"{method}-lora-out", "--overwrite", "-q") == 0
    assert run_cli("merge", r2, "-o", root / f"{method}-mat-out", "--overwrite", "-q") == 0
    got = _loaded_state(root / f"{method}-lora-out")
    want = _loaded_state(root / f"{method}-mat-out")
    for name, w in want.items():
        # The materialised checkpoints are PEFT's float32 merges: the two runs see task
        # vectors that differ by that rounding (~1e-8 here), and TIES/DARE are piecewise
        # linear in them (sign votes and magnitudes can flip only at ties).
        np.testing.assert_allclose(got[name].numpy(), w.numpy(), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("command", ["diff", "svd", "decompose", "merge-svd", "merge"])
def test_strict_refuses_a_recorded_base_mismatch_on_every_command(
    models: dict[str, Any], tmp_path: Path, capsys: Any, command: str
) -> None:
    """Wherever an adapter is a term, --strict turns the recorded-base warning into exit 2."""
    root = models["root"]
    other = root / "llama-other-strict"
    import shutil

    shutil.copytree(models["llama"], other, dirs_exist_ok=True)
    adapter = _edit_config(
        root / "llama-ab0",
        root / "llama-ab0-strict",
        base_model_name_or_path=str(other),
    )
    second = root / "llama-ab1"
    base = models["llama"]
    out = tmp_path / "out"
    argv: list[Any] = {
        "diff": ["diff", base, adapter, "-o", out],
        "svd": ["svd", adapter, "--base", base, "-o", out, "--rank", "2"],
        "decompose": ["decompose", adapter, second, "--base", base, "-o", out, "--rank", "2"],
        "merge-svd": [
            "merge-svd",
            "tsv",
            adapter,
            second,
            "--base",
            base,
            "-o",
            out,
            "--rank",
            "4",
        ],
    }.get(command, [])
    if command == "merge":
        recipe = tmp_path / "ties.yaml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {adapter}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {second}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        )
        argv = ["merge", recipe, "-o", out]
    assert run_cli(*argv, "-q", "--strict") == 2
    err = capsys.readouterr().err
    assert str(other) in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert run_cli(*argv, "-q") == 0  # without --strict: a warning naming both, and the output
    err = capsys.readouterr().err
    assert "warning" in err and str(other) in err


def test_merge_svd_of_adapters_with_different_targets(models: dict[str, Any], tmp_path) -> None:
    """tsv of two adapters: a module only one adapter targets is that adapter's update (the
    other's task vector is zero there); every module neither targets keeps the base."""
    from tests.families import read_all
    from tests.test_decompose_merge import tsv_reference

    root, base_dir = models["root"], models["llama"]
    out = tmp_path / "tsv"
    argv = ["merge-svd", "tsv", root / "llama-ab0", root / "llama-ab1", "--base", base_dir]
    assert run_cli(*argv, "-o", out, "--rank", "4", "-q") == 0
    base = {k: v.astype(np.float64) for k, v in read_all(base_dir).items()}
    got = read_all(out)
    taus = [
        {k: v.double().numpy() - base[k] for k, v in models[f"llama_ab{i}_merged"].items()}
        for i in (0, 1)
    ]
    for name in got:
        present = [t[name] for t in taus if np.abs(t[name]).max() > 0]
        want = base[name] + (tsv_reference(present, 4) if present else 0.0)
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert any("o_proj" in n for n in got)  # targeted by the second adapter only
