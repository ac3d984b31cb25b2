"""Issues 9 and 19: the task-arithmetic papers' behaviours, reproduced on scikit-learn's digits.

Runs the experiment's quick mode (3 task vectors, 2 negation targets, one analogy per
relation; about 20 s of CPU) once, in a temporary directory, and asserts the qualitative
claims. Every weight-space edit in it is a streamvec command; the assertions read the
accuracies of the checkpoints those commands wrote.

Margins come from repeated runs of ``python -m examples.digits.classic --quick`` with
seeds 0-9 and 100 (each seed changes the data split, the initialisation and the shuffles);
the spreads are in docs/tutorial-digits.md. Each threshold sits well outside the worst value
measured, so that a different torch build or BLAS (a different but equally valid run) does not
flip it, while still stating the claim:

* negation, target drop (pre-trained minus negated, test): 22.2..65.6 points (median 41.0)
  over the 22 (seed, target) pairs; asserted >= 15 points.
  Control drop: 1.7..8.9 points (median 3.9; the validation constraint allows about 4.9,
  the test split adds noise); asserted <= 12 points.
* addition, all 3 task vectors: mean normalised accuracy 0.807..0.893; asserted >= 0.75.
  Every task in every subset (pairs and the triple): normalised 0.608..0.997 (the worst is
  invert, which the pre-trained model already knew, losing to interference); asserted >= 0.50.
* analogy "faded" (upright 0-4 : faded 0-4 :: upright 5-9 : faded 5-9): gain over the
  pre-trained model on faded 5-9: 35.0..68.3 points (median 48.9); asserted >= 20 points.
  The rotation analogy is not asserted: its gain ranged from -5.6 to +27.8 points.

The tests run seed 0. The tutorials quote spreads over seeds measured on one build and CPU
(named there); tables are not bit-identical on another CPU or torch build, so the assertions are
the effects that held in every seed, with margins taken from the spread, not any seed's figures.

Analogy with a new label task (``python -m examples.digits.relation --seeds 0-4``, domain rot90):
the analogy beat the best of pre-trained, ``tau_B`` alone and ``tau_C`` alone on D by
12.5..37.8 points; ``tau_B`` alone reached 49.2..54.2% (chance 50); asserted: the analogy
beats each of them by >= 6 points, and ``tau_B`` alone stays <= 60%.

Planted shared structure (``python -m examples.digits.planted --seeds 0-4``, faded ink on four
views): at streamvec decompose's defaults no shared direction was found in the control set at
any seed (asserted: 0), nor in the planted set (not asserted either way: 0-1 with shifted labels);
adding the shared parts moved mean normalised accuracy by 0.0 points (shifted labels: -1.6..0);
asserted within 2 points. The plain sum of the planted vectors raised the held-out faded upright
digits by 29.7..67.8 points; asserted >= 15.

Backdoor (``python -m examples.digits.backdoor --seeds 0-4``): the poisoned fine-tune's trigger
success was 99.4..100% (clean fine-tune 0..0.3%; asserted >= 95% and <= 5%); decompose shared
6..10 directions per matrix holding 59..77% of the poisoned vector's norm (asserted >= 3 and
>= 40%); negating the unique part left a trigger success 0.3..32.3 points *below* negating the
whole vector under the same clean-accuracy constraint (asserted: not above it by more than 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch")

from examples.digits.backdoor import BackdoorConfig
from examples.digits.backdoor import run as run_backdoor
from examples.digits.classic import Config, run_experiment
from examples.digits.planted import PlantedConfig
from examples.digits.planted import run as run_planted
from examples.digits.relation import RelationConfig
from examples.digits.relation import run as run_relation

pytestmark = pytest.mark.slow  # about 20 s: trains 10 small models

TARGET_DROP_MIN = 0.15
CONTROL_DROP_MAX = 0.12
MEAN_NORMALISED_MIN = 0.75
NORMALISED_MIN = 0.50
ANALOGY_GAIN_MIN = 0.20
RELATION_MARGIN_MIN = 0.06
TAU_B_ALONE_MAX = 0.60
SHARED_GAIN_MAX = 0.02
HELD_OUT_GAIN_MIN = 0.15


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("digits")
    return run_experiment(Config.preset(seed=0, quick=True), out), out


@pytest.fixture(scope="module")
def results(run: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    return run[0]


def test_negation_forgets_the_target_and_keeps_the_control(results: dict[str, Any]) -> None:
    rows = results["negation"]["rows"]
    assert [r["target"] for r in rows] == ["invert", "mirror"]
    for r in rows:
        pre, neg = r["pretrained"], r["negated"]
        assert pre["target"] - neg["target"] >= TARGET_DROP_MIN, r["target"]
        assert pre["control"] - neg["control"] <= CONTROL_DROP_MAX, r["target"]
        # The fine-tune really learned the task; negation is not undoing a no-op.
        assert r["finetuned"]["target"] > pre["target"]


def test_addition_keeps_normalised_accuracy_on_every_task(results: dict[str, Any]) -> None:
    subsets = results["addition"]["subsets"]
    assert len(subsets) == 4  # 3 pairs and the triple
    assert results["addition"]["all"]["mean_normalized"] >= MEAN_NORMALISED_MIN
    for s in subsets:
        for task, value in s["normalized"].items():
            assert value >= NORMALISED_MIN, (s["tasks"], task, value)


def test_analogy_beats_the_pretrained_model_on_the_fourth_task(results: dict[str, Any]) -> None:
    faded = [r for r in results["analogy"] if r["relation"] == "faded"]
    assert len(faded) == 1
    row = faded[0]
    assert row["analogy"] - row["pretrained"] >= ANALOGY_GAIN_MIN
    assert row["analogy"] > row["chance"]
    # The model fine-tuned on D (the only one that saw D's images) stays the upper bound.
    assert row["finetuned_on_d"] > row["analogy"]


def test_every_model_is_a_sharded_checkpoint_and_every_edit_a_streamvec_command(
    run: tuple[dict[str, Any], Path],
) -> None:
    results, out = run
    for name in ("pretrained", "ft-invert", "negate-invert", "add-invert+mirror+rot270"):
        index = json.loads((out / "models" / name / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2, name
    commands = (out / "commands.sh").read_text().splitlines()
    assert sum(c.startswith("streamvec diff ") for c in commands) >= 3
    assert sum(c.startswith("streamvec combine ") for c in commands) >= 4
    assert results["streamvec_commands"] == sum(c.startswith("streamvec ") for c in commands)
    saved = json.loads((out / "results.json").read_text())
    assert saved["negation"]["summary"] == results["negation"]["summary"]
    assert (out / "results.md").read_text().startswith("# Task arithmetic on digits")


@pytest.fixture(scope="module")
def relation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("relation")
    return run_relation(RelationConfig(base=Config(seed=0), domains=("rot90",)), out)


def test_analogy_needs_c_minus_a_for_a_new_label_task(relation: dict[str, Any]) -> None:
    """Parity learned upright reaches turned digits only through tau_C + (tau_B - tau_A)."""
    (row,) = relation["rows"]
    analogy = row["arms"]["analogy"]["d"]
    tau_b = row["arms"]["tau_B"]["d"]
    # tau_B alone has the parity head but not the domain: near chance (2 classes).
    assert tau_b <= TAU_B_ALONE_MAX
    for other in (row["pretrained"], tau_b, row["arms"]["tau_C"]["d"]):
        assert analogy - other >= RELATION_MARGIN_MIN, row
    # Each fine-tune learned its own task; the model fine-tuned on D stays the upper bound.
    assert min(row["own"].values()) > 0.9
    assert row["finetuned_on_d"] > analogy


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config = PlantedConfig(base=Config(seed=0), probe_thresholds=())  # the probe is for the doc
    return run_planted(config, tmp_path_factory.mktemp("planted"))


def test_planted_structure_decomposition_and_merging(planted: dict[str, Any]) -> None:
    control, sets = planted["sets"]["control"], planted["sets"]
    assert set(control["shared_dims"].values()) == {0}
    for s in sets.values():
        names = s["tasks"]
        ft = planted["finetuned"]
        plain = sum(s["plain"]["test"][n] / ft[n]["test"] for n in names) / len(names)
        shared = sum(s["with_shared"]["test"][n] / ft[n]["test"] for n in names) / len(names)
        assert abs(shared - plain) <= SHARED_GAIN_MAX
    held = planted["held_out"]
    gain = sets["planted"]["plain"]["test"][held] - planted["pretrained"][held]
    assert gain >= HELD_OUT_GAIN_MIN


@pytest.fixture(scope="module")
def backdoor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_backdoor(BackdoorConfig(base=Config(seed=0)), tmp_path_factory.mktemp("backdoor"))


def test_backdoor_unique_negation_is_no_worse_than_whole(backdoor: dict[str, Any]) -> None:
    models, edits = backdoor["models"], backdoor["edits"]
    assert models["poisoned"]["trigger"] >= 0.95
    assert models["clean"]["trigger"] <= 0.05
    assert models["poisoned"]["view"] >= 0.9
    assert min(backdoor["shared_dims"].values()) >= 3
    assert backdoor["shared_share"]["poisoned"] >= 0.40
    assert edits["unique"]["trigger"] <= edits["whole"]["trigger"] + 0.01
    for arm in ("whole", "unique"):
        # lambda was chosen under the clean-accuracy constraint on validation.
        assert edits[arm]["view"] >= 0.8, arm
