"""Task arithmetic: combine against float64 references; edited models load in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import streamvec as sv
from streamvec.ops.combine import TermSpec, parse_term

from .conftest import (
    BF16,
    assert_matches_float64,
    run_cli,
    run_cli_subprocess,
    tiny_llama_config,
    ulp_distance,
)


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint through the real reader."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


@pytest.fixture(scope="module")
def weights(synth_family: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    out: dict[str, dict[str, np.ndarray]] = {}
    for key, path in synth_family.items():
        out[key] = {}
        for shard in sorted(path.glob("*.safetensors")):
            out[key].update(load_file(str(shard)))
    return out


def reference(
    w: dict[str, dict[str, np.ndarray]], name: str, coefs: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """theta_base + sum_k c_k (theta_k - theta_base) in float64 on whole tensors, and the
    magnitude sum |coef * operand| that bounds accumulation error under cancellation."""
    base = w["base"][name].astype(np.float64)
    total = base.copy()
    base_coef = 1.0 - sum(coefs.values())
    magnitude = np.abs(base_coef * base)
    for key, c in coefs.items():
        x = w[key][name].astype(np.float64)
        total += c * (x - base)
        magnitude += np.abs(c * x)
    return total, magnitude


CASES = {
    "negation": ["c:-1"],
    "addition": ["a:0.4", "b:0.4", "c:0.4"],
    "analogy": ["c", "b", "a:-1"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_combine_matches_float64_within_one_ulp(
    synth_family, weights, tmp_path: Path, case: str
) -> None:
    terms = [
        f"{synth_family[t.split(':')[0]]}{':' + t.split(':')[1] if ':' in t else ''}"
        for t in CASES[case]
    ]
    out = tmp_path / case
    assert (
        run_cli(
            "combine", "--base", synth_family["base"], "--scale", "0.7", "-o", out, "-q", *terms
        )
        == 0
    )
    got = load_checkpoint(out)
    coefs = {}
    for t in CASES[case]:
        key, _, w = t.partition(":")
        coefs[key] = 0.7 * float(w or 1)
    assert set(got) == set(weights["base"])
    for name, base in weights["base"].items():
        assert got[name].dtype == base.dtype, name
        if base.dtype.kind in "iub":
            assert got[name].tobytes() == base.tobytes()  # passes through unchanged
            continue
        exact, magnitude = reference(weights, name, coefs)
        assert_matches_float64(got[name], exact, magnitude, len(coefs) + 1, name)
    # non-weight files of the base come along
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (synth_family["base"] / "config.json").read_text()
    )


def test_combined_task_vector_store_and_stores_as_terms(
    synth_family, weights, tmp_path: Path
) -> None:
    fam = synth_family
    for k in ("a", "b"):
        assert run_cli("diff", fam["base"], fam[k], "-o", tmp_path / f"{k}.zarr", "-q") == 0
    out = tmp_path / "sum.zarr"
    assert (
        run_cli(
            "combine", "-o", out, "-q", f"{tmp_path / 'a.zarr'}:0.5", f"{tmp_path / 'b.zarr'}:-2"
        )
        == 0
    )
    tau = sv.open(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = weights["base"][name].astype(np.float64)
    want = 0.5 * (weights["a"][name] - base) - 2 * (weights["b"][name] - base)
    got = tau[name].compute()
    assert got.dtype == np.float32
    # Stored task vectors are float32-rounded before combining: compare with that rounding.
    ta = (weights["a"][name].astype(np.float64) - base).astype(np.float32).astype(np.float64)
    tb = (weights["b"][name].astype(np.float64) - base).astype(np.float32).astype(np.float64)
    want = (0.5 * ta - 2 * tb).astype(np.float32)
    assert ulp_distance(got, want).max() <= 1.0
    # A store term and the equivalent on-the-fly checkpoint term edit the model identically.
    e1, e2 = tmp_path / "e1", tmp_path / "e2"
    assert run_cli("combine", "--base", fam["base"], "-o", e1, "-q", str(tmp_path / "a.zarr")) == 0
    assert run_cli("combine", "--base", fam["base"], "-o", e2, "-q", str(fam["a"])) == 0
    g1, g2 = load_checkpoint(e1), load_checkpoint(e2)
    for n in g1:
        np.testing.assert_array_equal(g1[n], g2[n])


def test_filters_edit_only_matching_tensors(synth_family, weights, tmp_path: Path) -> None:
    out = tmp_path / "attn"
    code = run_cli(
        "combine",
        "--base",
        synth_family["base"],
        "-o",
        out,
        "-q",
        "--include",
        "*.self_attn.*_proj.weight",
        "--exclude",
        "re:layers\\.1\\.",
        f"{synth_family['a']}:1",
    )
    assert code == 0
    got = load_checkpoint(out)
    edited = 0
    for name, base in weights["base"].items():
        if ".self_attn." in name and name.endswith("_proj.weight") and "layers.1." not in name:
            # base + (ft - base) rounded once: the fine-tune itself, within 1 ulp
            assert ulp_distance(got[name], weights["a"][name]).max() <= 1.0, name
            edited += 1
        else:
            assert got[name].tobytes() == base.tobytes(), name  # untouched, bit for bit
    assert edited == 4


def test_api_expression_equals_cli(synth_family, weights, tmp_path: Path) -> None:
    fam = synth_family
    base = sv.open(fam["base"])
    tau_a, tau_b, tau_c = (sv.open(fam[k]) - base for k in "abc")
    edited = base + 0.4 * (tau_a + tau_b) - tau_c
    assert edited.combination().kind() == "model"
    edited.save(tmp_path / "api", progress=False)
    got = load_checkpoint(tmp_path / "api")
    for name, b in weights["base"].items():
        if b.dtype.kind in "iub":
            continue
        exact, magnitude = reference(weights, name, {"a": 0.4, "b": 0.4, "c": -1.0})
        assert_matches_float64(got[name], exact, magnitude, 4, name)


def test_missing_tensor_in_term(synth_family, weights, tmp_path: Path) -> None:
    fam = synth_family
    assert (
        run_cli(
            "diff",
            fam["base"],
            fam["a"],
            "-o",
            tmp_path / "q.zarr",
            "-q",
            "--include",
            "*.q_proj.*",
        )
        == 0
    )
    proc = run_cli_subprocess(
        "combine", "--base", fam["base"], "-o", tmp_path / "x", str(tmp_path / "q.zarr")
    )
    assert proc.returncode == 2
    assert "missing in" in proc.stderr and "--missing keep-base" in proc.stderr
    assert not (tmp_path / "x").exists()
    out = tmp_path / "kept"
    assert (
        run_cli(
            "combine",
            "--base",
            fam["base"],
            "-o",
            out,
            "-q",
            "--missing",
            "keep-base",
            str(tmp_path / "q.zarr"),
        )
        == 0
    )
    got = load_checkpoint(out)
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name].tobytes() == weights["base"][name].tobytes()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ulp_distance(got[q], weights["a"][q]).max() <= 1.0


def test_checkpoint_term_needs_base(synth_family, tmp_path: Path) -> None:
    proc = run_cli_subprocess("combine", "-o", tmp_path / "x.zarr", str(synth_family["a"]))
    assert proc.returncode == 2 and "--base" in proc.stderr


def test_parse_term() -> None:
    assert parse_term("a.zarr") == TermSpec("a.zarr", 1.0)
    assert parse_term("a.zarr:-0.5") == TermSpec("a.zarr", -0.5)
    assert parse_term("dir:with:colons") == TermSpec("dir:with:colons", 1.0)
    assert parse_term("/x/y:1e-1") == TermSpec("/x/y", 0.1)


def test_shard_size_and_dtype(synth_family, weights, tmp_path: Path) -> None:
    out = tmp_path / "f32"
    code = run_cli(
        "combine",
        "--base",
        synth_family["base"],
        "-o",
        out,
        "-q",
        "--shard-size",
        "100kB",
        "--dtype",
        "float32",
        str(synth_family["a"]),
    )
    assert code == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    got = load_checkpoint(out)
    name = "model.embed_tokens.weight"
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], weights["a"][name].astype(np.float32))
    assert got["model.position_ids_buffer"].dtype == np.int64


# -- transformers ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny real Llama saved with save_pretrained (sharded), and a fine-tune of it."""
    root = tmp_path_factory.mktemp("hf")
    config = tiny_llama_config(torch_dtype="bfloat16")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="20KB", safe_serialization=True)
    ft = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "self_attn" in name:
                p.add_(0.01 * torch.randn_like(p, dtype=torch.float32).to(p.dtype))
    ft.save_pretrained(root / "ft", max_shard_size="20KB", safe_serialization=True)
    return {"base": root / "base", "ft": root / "ft"}


def test_edited_model_loads_in_transformers(hf_models, tmp_path: Path) -> None:
    assert len(list(hf_models["base"].glob("*.safetensors"))) > 1
    out = tmp_path / "edited"
    assert (
        run_cli(
            "combine",
            "--base",
            hf_models["base"],
            "--scale",
            "0.5",
            "-o",
            out,
            "-q",
            f"{hf_models['ft']}:-1",
        )
        == 0
    )
    edited = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    base = transformers.LlamaForCausalLM.from_pretrained(
        hf_models["base"], torch_dtype=torch.bfloat16
    )
    ft = transformers.LlamaForCausalLM.from_pretrained(hf_models["ft"], torch_dtype=torch.bfloat16)
    sb, sf, se = base.state_dict(), ft.state_dict(), edited.state_dict()
    for name, b in sb.items():
        want = (b.double() - 0.5 * (sf[name].double() - b.double())).to(torch.bfloat16)
        got = se[name]
        assert got.dtype == torch.bfloat16
        diff = ulp_distance(got.float().numpy().astype(BF16), want.float().numpy().astype(BF16))
        assert diff.max() <= 1.0, name
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(edited(ids).logits).all()


def test_load_into_and_sweep(hf_models, tmp_path: Path) -> None:
    from streamvec.engine.into_torch import load_into, sweep

    net = transformers.LlamaForCausalLM.from_pretrained(
        hf_models["base"], torch_dtype=torch.bfloat16
    )
    base = sv.open(hf_models["base"])
    tau = sv.open(hf_models["ft"]) - base
    loaded = load_into(net, base + 1.0 * tau)
    assert "model.layers.0.self_attn.q_proj.weight" in loaded
    ft = transformers.LlamaForCausalLM.from_pretrained(hf_models["ft"], torch_dtype=torch.bfloat16)
    for name, p in ft.state_dict().items():
        assert torch.equal(net.state_dict()[name], p), name
    # the sweep picks the lambda closest to the fine-tune under a "distance to ft" metric
    q = "model.layers.0.self_attn.q_proj.weight"
    target = ft.state_dict()[q].float()

    def metric(m: torch.nn.Module) -> float:
        return -float((m.state_dict()[q].float() - target).norm())

    result = sweep(net, base, tau, metric, lambdas=[0.0, 0.5, 1.0])
    assert result.best_lambda == 1.0
    assert [lam for lam, _ in result.scores] == [0.0, 0.5, 1.0]
    assert result.scores[0][1] < result.scores[1][1] < result.scores[2][1]
