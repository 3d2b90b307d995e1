"""Agreement and bias statistics: exact values on a hand-computed case, biased simulated evaluators flagged
(and only they), exclusion honoured by aggregation and recorded in the audit log, the CLI command."""

from __future__ import annotations

import json

import pytest

from diffalign.feedback.agreement import LabeledRound, Thresholds, agreement_report, toy_image_attributes
from diffalign.feedback.simulated import SimulatedEvaluator
from diffalign.feedback.store import FeedbackError, FeedbackStore, NotFoundError

HONEST = ["ann", "bob", "cy"]
BIASED = {"blue-hater": "blue_is_bad", "coin": "random"}
PROMPTS = ["two blue circles", "one red square", "three blue triangles", "two green circles"]


def _round(labels: dict[str, str], prompt: str = "p", attributes=None) -> LabeledRound:
    """One round from label strings: ``{"a": "ggbb"}`` -> image ids 0.. labeled good/bad."""
    n = len(next(iter(labels.values())))
    ids = list(range(n))
    return LabeledRound(1, 0, prompt, ids, {e: {i: ("good" if s[i] == "g" else "bad") for i in ids}
                                            for e, s in labels.items()}, attributes or {})


def test_statistics_match_a_hand_computed_case():
    # a, b: observed agreement 3/4; chance (1/2 * 1/4 + 1/2 * 3/4) = 1/2, so Cohen's kappa = (0.75-0.5)/0.5.
    report = agreement_report([_round({"a": "ggbb", "b": "gbbb"})])
    (pair,) = report["pairwise"]
    assert pair["n"] == 4 and pair["agreement"] == pytest.approx(0.75) and pair["kappa"] == pytest.approx(0.5)
    rows = {r["evaluator"]: r for r in report["evaluators"]}
    assert rows["a"]["good_rate"] == pytest.approx(0.5) and rows["b"]["good_rate"] == pytest.approx(0.25)
    assert rows["a"]["agreement"] == pytest.approx(0.75)  # the other's "majority" is b alone
    # Fleiss, three raters on four images, by hand: P_i = (1, 1/3, 1/3, 1); P_bar = 2/3;
    # p_good = 5/12, p_bad = 7/12, P_e = 74/144 = 37/72; kappa = (2/3 - 37/72) / (1 - 37/72) = 11/35.
    fleiss = agreement_report([_round({"a": "ggbb", "b": "gbgb", "c": "gbbb"})])["fleiss"]
    assert fleiss["overall"]["kappa"] == pytest.approx(11 / 35)
    assert fleiss["overall"]["items"] == 4 and fleiss["overall"]["raters"] == 3
    assert fleiss["rounds"][0]["kappa"] == pytest.approx(11 / 35)
    # Two raters who each used one label only: kappa is 0/0, reported as undefined, not as a number.
    assert agreement_report([_round({"a": "gggg", "b": "gggg"})])["pairwise"][0]["kappa"] is None


def test_few_images_are_shown_but_never_flagged():
    # A complete disagreement on 4 images is below min_items (10): no flag, the numbers are still there.
    report = agreement_report([_round({"a": "gggg", "b": "bbbb", "c": "bbbb"})])
    assert report["flagged"] == []
    assert {r["evaluator"]: r["agreement"] for r in report["evaluators"]}["a"] == 0.0
    with pytest.raises(ValueError, match="min_agreement"):
        Thresholds(min_agreement=1.5)


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    """A run of 8 rounds x 16 toy images labeled by three honest (5% noise) and two biased evaluators."""
    from tests.feedback.conftest import mixed_images

    store = FeedbackStore(tmp_path_factory.mktemp("agreement") / "store")
    run = store.create_run("panel")
    evaluators = [SimulatedEvaluator(name=n, noise_rate=0.05, seed=k + 1) for k, n in enumerate(HONEST)]
    evaluators += [SimulatedEvaluator(name=n, bias=b, seed=9) for n, b in BIASED.items()]
    for k in range(8):
        prompt = PROMPTS[k % len(PROMPTS)]
        imgs, _ = mixed_images(prompt, 16, seed=100 + k)
        attrs = toy_image_attributes(imgs)
        info = store.create_round(run, k, prompt, imgs, evaluators_required=5,
                                  image_metadata=[{"attributes": a} for a in attrs])
        for ev in evaluators:
            ev.label_round(store, info.id)
        store.close_round(info.id)
    yield store, run
    store.close()


def test_exactly_the_biased_evaluators_are_flagged_with_evidence(panel):
    store, run = panel
    report = store.agreement(run)
    assert sorted(report["flagged"]) == sorted(BIASED)
    rows = {r["evaluator"]: r for r in report["evaluators"]}
    # The blue-hater is caught on blue images: good rate 0 there, against the others' majority.
    blue = next(g for g in rows["blue-hater"]["groups"] if g["group"] == "colour=blue")
    assert blue["flagged"] and blue["good_rate"] == 0.0 and blue["others_good_rate"] >= 0.25
    assert any(f.startswith("colour=blue:") and "McNemar" in f for f in rows["blue-hater"]["flags"])
    # ...and not on red or green images, where it judges like everyone else.
    assert not any(g["flagged"] for g in rows["blue-hater"]["groups"] if g["group"] in ("colour=red", "colour=green"))
    # The coin agrees about half the time and its kappas are near 0; the honest ones agree closely.
    assert rows["coin"]["agreement"] < 0.7 and abs(rows["coin"]["mean_kappa"]) < 0.25
    assert any("agrees with the others' majority" in f for f in rows["coin"]["flags"])
    for name in HONEST:
        assert rows[name]["agreement"] >= 0.85 and rows[name]["flags"] == []
    kappas = {(p["a"], p["b"]): p["kappa"] for p in report["pairwise"]}
    assert kappas[("ann", "bob")] > 0.7
    assert len(report["fleiss"]["rounds"]) == 8 and report["fleiss"]["overall"]["items"] == 8 * 16
    assert report["fleiss"]["overall"]["raters"] == 5


def test_excluding_an_evaluator_changes_open_and_later_rounds_only(store, images):
    run = store.create_run("exclusion")
    imgs, _ = images.mixed("two blue circles", 6, seed=3)
    first = store.create_round(run, 0, "two blue circles", imgs, evaluators_required=2)
    ids = first.image_ids

    def submit(rnd, who, good):
        labels = {i: ("good" if i in good else "bad") for i in rnd.image_ids}
        store.submit(rnd.id, who, labels, min(good) if good else None)

    for who in ("a", "b", "c"):
        submit(first, who, set(ids[:3]) if who != "c" else set())
    closed = store.close_round(first.id)
    assert set(closed.per_evaluator) == {"a", "b", "c"} and closed.labels_used == 18
    second = store.create_round(run, 1, "two blue circles", imgs[::-1], evaluators_required=2)
    submit(second, "c", set())  # before the decision

    with pytest.raises(FeedbackError, match="decided_by"):
        store.exclude_evaluator(run, "c", decided_by=" ")
    with pytest.raises(NotFoundError, match="evaluator: 'dora' has labeled nothing"):
        store.exclude_evaluator(run, "dora", decided_by="lead")
    assert store.exclude_evaluator(run, "c", decided_by="lead", reason="calls everything bad")["changed"]
    assert not store.exclude_evaluator(run, "c", decided_by="lead")["changed"]  # recorded once

    submit(second, "a", set(second.image_ids[:2]))
    assert not store.round_complete(second.id)  # c's submission no longer completes the round
    assert [r.id for r in store.open_rounds(run)] == [second.id]
    submit(second, "b", set(second.image_ids[:2]))
    fb = store.close_round(second.id)
    assert set(fb.per_evaluator) == {"a", "b"} and fb.labels_used == 12 and sum(fb.good) == 2
    assert store.round_feedback(first.id).per_evaluator.keys() == {"a", "b", "c"}  # what trained stays
    assert store.label_count(run) == 18 + 12
    (entry,) = store.audit_log(run)
    assert entry["action"] == "exclude_evaluator" and entry["actor"] == "lead"
    assert entry["detail"] == {"evaluator": "c", "reason": "calls everything bad"}
    report = store.agreement(run)
    row = next(r for r in report["evaluators"] if r["evaluator"] == "c")
    assert row["excluded"]["decided_by"] == "lead" and row["items"] == 12  # still analysed
    store.exclude_evaluator(run, "c", decided_by="lead", include=True)
    assert store.excluded_evaluators(run) == {} and len(store.audit_log(run)) == 2


def test_unknown_bias_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="bias: unknown bias 'purple_is_bad'.*blue_is_bad"):
        SimulatedEvaluator(bias="purple_is_bad")


def test_cli_prints_the_table_and_json(panel):
    from typer.testing import CliRunner

    from diffalign.cli import app

    store, _ = panel
    result = CliRunner().invoke(app, ["feedback", "agreement", "--store", str(store.directory)])
    assert result.exit_code == 0, result.output
    assert "Fleiss' kappa overall" in result.output and result.output.count("FLAGGED") == 2
    assert "colour=blue" in result.output
    as_json = CliRunner().invoke(app, ["feedback", "agreement", "--store", str(store.directory), "--json"])
    assert sorted(json.loads(as_json.output)["flagged"]) == sorted(BIASED)
    missing = CliRunner().invoke(app, ["feedback", "agreement", "--store", str(store.directory), "--run", "nope"])
    assert missing.exit_code != 0 and "run: no run named 'nope'" in missing.output


def test_run_page_api_and_report_section(panel):
    from fastapi.testclient import TestClient

    from diffalign.feedback.agreement import report_html
    from diffalign.feedback.server import create_app

    store, run = panel
    with TestClient(create_app(store)) as client:
        got = client.get(f"/api/runs/{run}/agreement")
        assert got.status_code == 200 and sorted(got.json()["flagged"]) == sorted(BIASED)
        assert client.get("/api/runs/999/agreement").status_code == 404
    section = report_html(store.agreement(run))
    assert section.count("<b>flagged</b>") == 2 and "colour=blue" in section and "Fleiss" in section


def test_cli_exclude_records_who_decided(store, images):
    from typer.testing import CliRunner

    from diffalign.cli import app

    run = store.create_run("cli")
    imgs, _ = images.mixed("one red square", 4, seed=5)
    info = store.create_round(run, 0, "one red square", imgs)
    store.submit(info.id, "coin", {i: "bad" for i in info.image_ids}, None)
    args = ["feedback", "exclude", "coin", "--store", str(store.directory), "--by", "dana", "--reason", "test"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "coin: excluded from aggregation" in result.output
    assert store.audit_log(run)[0]["actor"] == "dana" and not store.round_complete(info.id)
    nobody = CliRunner().invoke(app, ["feedback", "exclude", "zed", "--store", str(store.directory), "--by", "dana"])
    assert nobody.exit_code != 0 and "evaluator: 'zed' has labeled nothing" in nobody.output
