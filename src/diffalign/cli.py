"""The ``diffalign`` command: a thin layer over the Python API (each command calls one function)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Align text-to-image diffusion models.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: train the tiny pipeline, measure it.")
app.add_typer(toy_app, name="toy")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (see configs/).")
SetOpt = typer.Option(None, "--set", help="Override a field: --set train.epochs=3 (repeatable).")


def _echo(message: str) -> None:
    """Print once per job: under ``accelerate launch`` only the main process speaks."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(message)


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(fn):
    """Known failures print one clear message, not a traceback."""
    from .config import ConfigError
    from .pipeline import ModelLoadError
    from .reliability import CheckpointError
    from .rewards import RewardError

    try:
        return fn()
    except (ConfigError, ModelLoadError, RewardError, CheckpointError, FileNotFoundError, FloatingPointError,
            TimeoutError) as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; resume with --resume", 130)


@app.command()
def train(config: Path = ConfigOpt, set_: list[str] = SetOpt, resume: bool = typer.Option(False, "--resume",
          help="Continue from the newest complete checkpoint of output_dir.")):
    """Fine-tune a LoRA with DDPO, DAG-DB or DAG-KL toward a reward."""
    from .config import load_config
    from .trainer import train as run_train

    def go():
        cfg = load_config(config, set_ or [])
        result = run_train(cfg, resume=resume)
        _echo(f"LoRA written to {result.lora_dir}")
    _run(go)


@app.command()
def sample(run: Path = typer.Option(None, help="A finished run directory (its LoRA is applied)."),
           model: str = typer.Option("toy", help="Base model when no --run is given."),
           prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt (repeatable)."),
           prompts: str = typer.Option(None, help="Prompt set name or file instead of --prompt."),
           n: int = typer.Option(4, help="Images per prompt."), seed: int = typer.Option(0),
           steps: int = typer.Option(20), guidance: float = typer.Option(4.0), eta: float = typer.Option(1.0),
           base: bool = typer.Option(False, "--base", help="With --run: sample the base model (LoRA off)."),
           out: Path = typer.Option(Path("samples.png"), help="Output grid PNG.")):
    """Sample an image grid from fixed seeds, base or base+LoRA."""
    from PIL import Image

    from .evaluate import generate, load_tuned_pipeline
    from .pipeline import load_pipeline
    from .prompts import resolve_prompts
    from .report import image_grid

    def go():
        plist = list(prompt) if prompt else resolve_prompts(prompts or "eval_count")
        if run is not None:
            pipe, _ = load_tuned_pipeline(run)
            if base:
                pipe.disable_lora()
        else:
            pipe = load_pipeline(model)
        images = generate(pipe, plist, n, seed, steps, guidance, eta)
        Image.fromarray(image_grid(images.images, columns=n if n > 1 else 8)).save(out)
        typer.echo(f"{len(images.prompts)} images -> {out}")
    _run(go)


@app.command("eval")
def eval_(run: Path = typer.Argument(..., help="A finished run directory.")):
    """Mean reward, toy success, diversity and drift, base vs tuned, on the run's eval prompts."""
    from .evaluate import evaluate_run

    def go():
        result = evaluate_run(run)
        _print_eval(result)
    _run(go)


@app.command()
def report(run: Path = typer.Argument(..., help="A run directory."), evaluate: bool = typer.Option(
        True, help="Run the evaluation first if eval.json is missing.")):
    """Write <run>/report.html: curves, before/after grids, the metrics table."""
    from .evaluate import evaluate_run
    from .report import write_report

    def go():
        if evaluate and not (run / "eval.json").exists():
            evaluate_run(run)
        typer.echo(f"report: {write_report(run)}")
    _run(go)


@app.command()
def demo(config: Path = typer.Option(Path("configs/demo.toml"), "--config", "-c"), set_: list[str] = SetOpt,
         resume: bool = typer.Option(False, "--resume")):
    """The main job on the toy model: train, evaluate before/after, write the report."""
    from .config import load_config
    from .evaluate import evaluate_run
    from .report import write_report
    from .trainer import train as run_train

    def go():
        cfg = load_config(config, set_ or [])
        result = run_train(cfg, resume=resume)
        evaluation = evaluate_run(result.output_dir)
        path = write_report(result.output_dir)
        _print_eval(evaluation)
        typer.echo(f"report: {path}")
    _run(go)


def _print_eval(result: dict) -> None:
    b, t = result["base"], result["tuned"]
    typer.echo(f"{'metric':<12}{'base':>10}{'tuned':>10}")
    for key in ("reward_mean", "success", "partial", "diversity"):
        if key in b:
            typer.echo(f"{key:<12}{b[key]:>10.4f}{t[key]:>10.4f}")
    typer.echo(f"{'drift':<12}{'':>10}{result['drift']:>10.4f}   ({result['num_images']} images, fixed seeds)")


feedback_app = typer.Typer(help="Fine-tune from good/bad/best labels (HERO, D3PO, DDPO-binary); tools for its store.")
app.add_typer(feedback_app, name="feedback")


@feedback_app.callback(invoke_without_command=True)
def feedback(ctx: typer.Context, config: Path = ConfigOpt, set_: list[str] = SetOpt,
             evaluator: str = typer.Option("human", help="'human' (the labeling app; prints its URL) or 'simulated'."),
             resume: bool = typer.Option(False, "--resume", help="Continue after the last finished round.")):
    """Fine-tune from good/bad/best labels with HERO, D3PO or DDPO-binary (or run a subcommand below)."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import load_config
    from .feedback.loop import run_feedback

    def go():
        cfg = load_config(config, set_ or [])
        result = run_feedback(cfg, evaluator=evaluator, resume=resume, log=typer.echo)
        _echo(f"{result.labels_used} labels used; LoRA written to {result.lora_dir}; report "
              f"{result.output_dir / 'feedback_report.html'}")
    _run(go)


@feedback_app.command("backup")
def feedback_backup(store: Path = typer.Option(..., "--store", help="The feedback store directory "
                                               "(<output_dir>/feedback)."),
                    out: Path = typer.Argument(..., help="A new (or empty) directory for the copy.")):
    """Copy a feedback store consistently, also while a session runs (SQLite's online backup API)."""
    from .feedback.backup import backup_store

    def go():
        info = backup_store(store, out)
        typer.echo(f"backup of {store} -> {info['path']}: {info['runs']} run(s), {info['rounds']} round(s), "
                   f"{info['submissions']} submission(s), {info['labels']} label(s), {info['images']} image(s)")
    _run(go)


def _feedback_run(store, run: str | None) -> int:
    """The id of run ``run`` in a feedback store, or of its latest run; FeedbackError naming the choices."""
    from .feedback.store import FeedbackError

    runs = store.list_runs()
    if not runs:
        raise FeedbackError(f"run: the feedback store {store.directory} holds no run yet")
    if run is None:
        return runs[-1]["id"]
    for r in runs:
        if r["name"] == run:
            return r["id"]
    raise FeedbackError(f"run: no run named {run!r} in {store.directory}; its runs: {', '.join(r['name'] for r in runs)}")


StoreOpt = typer.Option(..., "--store", help="The feedback store directory (<output_dir>/feedback).")
RunNameOpt = typer.Option(None, "--run", help="The run's name (default: the store's latest run).")


@feedback_app.command("agreement")
def feedback_agreement(store: Path = StoreOpt, run: str = RunNameOpt,
                       as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
                       min_agreement: float = typer.Option(0.75, help="Flag agreement with the others' majority "
                                                           "below this."),
                       max_rate_gap: float = typer.Option(0.25, help="Flag a good-rate gap to the others' majority "
                                                          "of at least this (with McNemar p < --alpha)."),
                       alpha: float = typer.Option(0.05, help="Significance level of McNemar's exact test."),
                       min_items: int = typer.Option(10, help="Never flag on fewer images than this.")):
    """How far the evaluators agree (Cohen's and Fleiss' kappa) and whose "good" rate leans (flags with evidence)."""
    import json as _json

    from .feedback.agreement import Thresholds, format_report
    from .feedback.store import FeedbackStore

    def go():
        if not (store / "feedback.sqlite").is_file():
            raise FileNotFoundError(f"store: no feedback store in {store} (feedback.sqlite missing)")
        th = Thresholds(min_agreement=min_agreement, max_rate_gap=max_rate_gap, alpha=alpha, min_items=min_items)
        with FeedbackStore(store) as s:
            report = s.agreement(_feedback_run(s, run), th)
        typer.echo(_json.dumps(report, indent=1) if as_json else format_report(report))
    _run(go)


@feedback_app.command("exclude")
def feedback_exclude(evaluator: str = typer.Argument(..., help="The evaluator whose labels stop counting."),
                     store: Path = StoreOpt, run: str = RunNameOpt,
                     by: str = typer.Option(..., "--by", help="Who decides (recorded in the audit log)."),
                     reason: str = typer.Option("", help="Why (recorded in the audit log)."),
                     undo: bool = typer.Option(False, "--undo", help="Count the evaluator's labels again.")):
    """Exclude an evaluator's labels from the open and later rounds (closed rounds keep what trained)."""
    from .feedback.store import FeedbackStore

    def go():
        with FeedbackStore(store) as s:
            result = s.exclude_evaluator(_feedback_run(s, run), evaluator, decided_by=by, reason=reason, include=undo)
        state = "excluded from" if result["excluded"] else "counted again in"
        typer.echo(f"{result['evaluator']}: {state} aggregation" + ("" if result["changed"] else " (already)"))
    _run(go)


@feedback_app.command("invite")
def feedback_invite(names: list[str] = typer.Argument(..., help="The evaluators to invite (unique without case)."),
                    store: Path = StoreOpt,
                    by: str = typer.Option(..., "--by", help="Who invites (recorded in the audit log)."),
                    url: str = typer.Option("http://127.0.0.1:8765/", help="The labeling app's address as the "
                                            "evaluators reach it (behind your TLS reverse proxy, if any)."),
                    reissue: bool = typer.Option(False, "--reissue", help="Give already-invited evaluators a new "
                                                 "link; their old one stops working.")):
    """Invite evaluators: each gets a personal link whose secret token signs their labels (printed once only).

    Once a store has an invitation, the labeling app accepts labels only through personal links.
    """
    from .feedback.store import FeedbackStore

    def go():
        with FeedbackStore(store) as s:
            invited = s.invite(names, invited_by=by, reissue=reissue)
        base = url if url.endswith("/") else url + "/"
        typer.echo("Personal links (shown only now: the store keeps a hash; send each to its person privately):")
        for name, token in invited:
            # The token rides in the fragment (#...), which browsers never send to a server or proxy log.
            typer.echo(f"  {name}: {base}#invite={token}")
    _run(go)


@app.command()
def compare(a: str = typer.Argument(..., help="Model A (the incumbent): a run directory, a LoRA directory or 'base'."),
            b: str = typer.Argument(..., help="Model B (the candidate): a run directory, a LoRA directory or 'base'."),
            model: str = typer.Option(None, help="Base model for 'base' and for a LoRA outside a run (default: the "
                                      "run's base model, else toy)."),
            prompts: str = typer.Option("hard_counting", help="Prompt set name or file."),
            samples_per_prompt: int = typer.Option(16, help="Pairs per prompt (each from its own noise)."),
            seed: int = typer.Option(1234, help="Seed of the shared noises (and of the side A is shown on)."),
            steps: int = typer.Option(20), guidance: float = typer.Option(4.0), eta: float = typer.Option(1.0),
            evaluator: str = typer.Option("simulated", help="'simulated' (the toy judge picks) or 'human' (the app)."),
            ties: str = typer.Option("half", help="'half': a tie counts as half a win for B; 'exclude': ties are "
                                     "left out. Fixed for the comparison."),
            gate: float = typer.Option(0.5, help="Ship if the lower bound of B's win rate is above this."),
            safety_filter: str = typer.Option(None, help="Hide images this filter flags (e.g. toy_red_objects)."),
            name: str = typer.Option(None, help="Comparison name (default: ab-<hash>; evaluators see it)."),
            out: Path = typer.Option(Path("runs/compare"), help="Where compare.json and compare_report.html go."),
            store: Path = typer.Option(None, "--store", help="Feedback store (default <out>/feedback)."),
            by: str = typer.Option("cli", "--by", help="Who runs the comparison (recorded in the audit log).")):
    """Blind A/B test of two models on the same prompts and noise: B's win rate with a 95% interval, and a verdict."""
    from .abtest import format_summary
    from .compare import CompareSettings, run_compare

    def go():
        settings = CompareSettings(prompts=prompts, samples_per_prompt=samples_per_prompt, seed=seed, num_steps=steps,
                                   guidance_scale=guidance, eta=eta, ties=ties, gate=gate, safety_filter=safety_filter)
        done = run_compare(a, b, settings, out, model=model, evaluator=evaluator, name=name, store_dir=store, by=by,
                           log=typer.echo)
        if evaluator == "human":
            typer.echo(f"comparison {done['name']} ({done['result']['pairs']} pairs) stored in {done['store']}.\n"
                       f"serve it: python -m diffalign.feedback.server --store {done['store']}  and open "
                       f"{done['url']}\nthen: diffalign compare-results --store {done['store']} --name {done['name']} "
                       f"--out {out}")
            return
        typer.echo(format_summary(done["result"], done["result"]["model_a"], done["result"]["model_b"]))
        typer.echo(f"report: {done['report']}")
    _run(go)


@app.command("compare-results")
def compare_results(store: Path = typer.Option(..., "--store", help="The feedback store of the comparison."),
                    name: str = typer.Option(None, help="The comparison (default: the store's latest)."),
                    out: Path = typer.Option(Path("runs/compare"), help="Where compare.json and the report go.")):
    """Win rate, interval and verdict of a comparison from the picks so far (ties and gate as it was created)."""
    from .abtest import format_summary
    from .compare import finish_comparison
    from .feedback.store import FeedbackError, FeedbackStore

    def go():
        if not (store / "feedback.sqlite").is_file():
            raise FileNotFoundError(f"--store: no feedback store in {store} (feedback.sqlite missing)")
        with FeedbackStore(store) as s:
            found = s.list_comparisons()
            cid = s.find_comparison(name) if name else (found[-1]["id"] if found else None)
            if cid is None:
                raise FeedbackError(f"--name: no comparison {name!r} in {store}; it holds: "
                                    f"{', '.join(c['name'] for c in found) or 'none'}")
            result, report = finish_comparison(s, cid, out)
        typer.echo(format_summary(result, result["model_a"], result["model_b"]))
        typer.echo(f"report: {report}")
    _run(go)


@app.command()
def rewards():
    """List the built-in rewards."""
    from .rewards import REWARDS

    for name, factory in sorted(REWARDS.items()):
        doc = (factory.__doc__ or "").strip().splitlines()
        typer.echo(f"{name:<24}{doc[0] if doc else ''}")


@toy_app.command("train")
def toy_train(out: Path = typer.Option(Path("runs/toy-pretrain"), help="Working directory (checkpoints)."),
              export: Path = typer.Option(None, help="Where to write the finished pipeline."),
              seed: int = typer.Option(0), vae_steps: int = typer.Option(1000), unet_steps: int = typer.Option(6000),
              num_scenes: int = typer.Option(10000), threads: int = typer.Option(0)):
    """Pretrain the toy pipeline from scratch (resumes from <out> if checkpoints are there)."""
    from .toy.train import ToyTrainConfig, train_toy_model

    cfg = ToyTrainConfig(out_dir=str(out), export_dir=str(export or ""), seed=seed, vae_steps=vae_steps,
                         unet_steps=unet_steps, num_scenes=num_scenes, threads=threads)
    _run(lambda: train_toy_model(cfg, log=lambda m: typer.echo(m)))


@toy_app.command("train-decoder")
def toy_train_decoder(out: Path = typer.Option(Path("runs/toy-decoder"), help="Working directory (checkpoints)."),
                      export: Path = typer.Option(None, help="Where to write the decoder (diffusers AutoencoderTiny)."),
                      seed: int = typer.Option(0), steps: int = typer.Option(1500),
                      trajectories: int = typer.Option(192, help="Sampled trajectories whose x0-predictions it learns.")):
    """Distil the toy VAE's decoder into a small one for DAG's forward-looking rewards (resumable)."""
    from .toy.decoder import DecoderTrainConfig, train_decoder

    cfg = DecoderTrainConfig(out_dir=str(out), export_dir=str(export or ""), seed=seed, steps=steps,
                             num_trajectories=trajectories)
    _run(lambda: train_decoder(cfg, log=lambda m: typer.echo(m)))


@toy_app.command("train-flow")
def toy_train_flow(out: Path = typer.Option(Path("runs/toy-flow-pretrain"), help="Working directory (checkpoints)."),
                   export: Path = typer.Option(None, help="Where to write the pipeline (diffusers SD3 layout)."),
                   seed: int = typer.Option(0), steps: int = typer.Option(6000), batch: int = typer.Option(64),
                   scenes: int = typer.Option(10000, help="Captioned scenes rendered and encoded once."),
                   threads: int = typer.Option(0, help="torch threads (0: all cores).")):
    """Pretrain the toy flow-matching model (SD3 architecture) on the toy world with the shipped toy VAE
    (resumable: run the same command again after a stop)."""
    from .toy.train_flow import ToyFlowTrainConfig, train_toy_flow_model

    cfg = ToyFlowTrainConfig(out_dir=str(out), export_dir=str(export or ""), seed=seed, steps=steps, batch=batch,
                             num_scenes=scenes, threads=threads)
    _run(lambda: train_toy_flow_model(cfg, log=lambda m: typer.echo(m)))


@toy_app.command("card")
def toy_card(model: str = typer.Option("toy", help="Pipeline to measure ('toy' or a directory)."),
             out: Path = typer.Option(Path("docs"), help="Where the card and its PNGs go."),
             samples: int = typer.Option(16, help="Images per count prompt.")):
    """Measure the toy pipeline with the judge; write docs/toy_model_card.md and hard_counting.txt."""
    import json as _json

    from .pipeline import load_pipeline, resolve_model
    from .toy.card import CardSettings, measure, write_card

    def go():
        pipe = load_pipeline(model)
        results = measure(pipe, CardSettings(samples_count=samples), log=typer.echo)
        model_dir = Path(resolve_model(model))
        info = model_dir / "toy_training.json"
        training = _json.loads(info.read_text()) if info.is_file() else None
        flat = None
        if training:
            flat = {"unet steps": training.get("unet_step"), **{k: v for k, v in training["config"].items()
                                                                if k not in ("out_dir", "export_dir")}}
            flat.update({k: v for k, v in training.items() if k.startswith("time")})
        card = write_card(results, out, model_dir, "diffalign toy train --export src/diffalign/toy/model", flat)
        typer.echo(f"model card: {card}")
    _run(go)


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
