"""`stagediff compare` and `stagediff report`: four families trained a few steps on the same data,
the page and its PNGs, the numbers in its tables, and the page rendered in headless Chromium."""

import html
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from stagediff.pipelines.cli import main
from stagediff.pipelines.report import COMPARISON_COLUMNS, fmt

from helpers import tiny_vae_config
from reliability.helpers import train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY_UNET = {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 8,
             "num_train_timesteps": 100, "num_inference_steps": 5, "num_eval_samples": 16}
SHORT = {"max_steps": 2, "batch_size": 16, "log_every": 1}
FAMILY_STAGES = ["vae", "ldm", "latent_flow", "latent_gan", "pixel_ddpm"]


def family_config(output_dir) -> dict:
    """configs/compare_families.yaml in miniature: a VAE, three stage-2 families on its latents, a pixel DDPM."""
    raw = tiny_vae_config(output_dir, max_steps=2)
    raw["stages"] += [
        {"name": "ldm", "kind": "ddpm", "input": "vae", "model": TINY_UNET, "training": SHORT},
        {"name": "latent_flow", "kind": "flow", "input": "vae",
         "model": {"num_scales": 1, "steps_per_scale": 2, "hidden_channels": 8, "num_blocks": 1,
                   "num_eval_samples": 16},
         "training": {**SHORT, "eval_every": 1}},
        {"name": "latent_gan", "kind": "gan", "input": "vae",
         "model": {"latent_dim": 8, "base_channels": 8, "max_channels": 16, "num_eval_samples": 16},
         "training": SHORT},
        {"name": "pixel_ddpm", "kind": "ddpm", "model": TINY_UNET, "training": SHORT},
    ]
    return raw


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """`stagediff compare --config FILE`: trains every stage, then writes OUTPUT_DIR/report."""
    folder = tmp_path_factory.mktemp("compare")
    raw = family_config(folder / "run")
    config_file = folder / "families.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    main(["compare", "--config", str(config_file)])
    return folder / "run", folder / "run" / "report"


def table(page: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, flags=re.S).group(1)
    return [[html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_compare_trains_every_family_and_tabulates_their_measured_metrics(compared):
    run_dir, report = compared
    assert all((run_dir / name / "done.json").is_file() for name in FAMILY_STAGES)
    page = (report / "index.html").read_text()
    rows = {row[0]: dict(zip(COMPARISON_COLUMNS, row)) for row in table(page, "comparison")}
    assert list(rows) == [f"run/{name}" for name in FAMILY_STAGES]
    for name in FAMILY_STAGES[1:]:  # the cells are the stage's own metrics.json
        metrics = json.loads((run_dir / name / "metrics.json").read_text())
        row = rows[f"run/{name}"]
        assert row["FD"] == fmt(metrics["fd"]) and row["classes"] == fmt(metrics["classes_covered"])
        assert row["sampling s / sample"] == fmt(metrics["sampling_seconds_per_sample"])
        assert row["training s"] == fmt(metrics["train_seconds"], 4)
    # Equal compute: a latent stage's budget counts its VAE's training too, a pixel stage's its own.
    seconds = {name: json.loads((run_dir / name / "metrics.json").read_text())["train_seconds"]
               for name in ("vae", "ldm", "pixel_ddpm")}
    assert rows["run/ldm"]["training s with inputs"] == (
        f"{fmt(seconds['ldm'] + seconds['vae'], 4)} (ldm {fmt(seconds['ldm'], 4)} + vae {fmt(seconds['vae'], 4)})")
    assert rows["run/pixel_ddpm"]["training s with inputs"] == fmt(seconds["pixel_ddpm"], 4)
    assert rows["run/ldm"]["space"] == "VAE latents" and rows["run/pixel_ddpm"]["space"] == "pixels"
    assert rows["run/ldm"]["evaluations / sample"] == "5 (dpmsolver) + decoder"
    assert rows["run/latent_gan"]["evaluations / sample"] == "1 + decoder"
    vae_metrics = json.loads((run_dir / "vae" / "metrics.json").read_text())
    assert rows["run/vae"]["likelihood"] == f"bound: −ELBO {fmt(vae_metrics['neg_elbo_bits_per_dim'])} bits/dim"
    flow_metrics = json.loads((run_dir / "latent_flow" / "metrics.json").read_text())
    assert rows["run/latent_flow"]["likelihood"] == f"exact: {fmt(flow_metrics['val_nll_nats'])} nats per latent"
    assert rows["run/latent_gan"]["likelihood"] == "none"
    # Parameters of the sampling network only: the generator, not the discriminator or the VAE.
    assert int(rows["run/latent_gan"]["parameters"].replace(",", "")) < int(
        rows["run/ldm"]["parameters"].replace(",", "")) + 10**7  # a count, not a placeholder
    assert all(int(row["parameters"].replace(",", "")) > 0 for row in rows.values())


def test_the_courses_table_of_advantages_and_drawbacks_is_measured(compared):
    _, report = compared
    page = (report / "index.html").read_text()
    assert "<th>normalizing flow</th><th>VAE</th><th>DDPM</th><th>GAN</th>" in page
    lines = {row[0]: row[1:] for row in table(page, "families")}
    flow, vae, ddpm, gan = lines["ln p(x) of a datum"]
    assert flow.startswith("+ exact") and vae.startswith("−") and gan == "− none"
    assert all(re.search(r"FD [\d.]+", cell) for cell in lines["samples (FD, classes covered)"])
    assert lines["efficient sampling"][2].startswith("− network passes: 5 (dpmsolver) + decoder")


def test_every_stage_has_curves_samples_and_metrics(compared):
    _, report = compared
    page = (report / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    for name in FAMILY_STAGES:
        assert f"run-{name}-curves.png" in images and f"run-{name}-samples.png" in images
    assert all((report / image).stat().st_size > 1000 for image in images)
    assert not re.search(r'(src|href)="(https?:|//)', page)  # nothing fetched from elsewhere
    assert "top: validation images and their reconstructions" in page


def test_history_is_cut_back_to_the_resumed_step(tmp_path):
    """A resume logs the steps after its checkpoint again; the rows they replace are dropped, so
    the curves show one trajectory."""
    raw = tiny_vae_config(tmp_path / "run", max_steps=4, log_every=1, checkpointing_steps=2)
    train(raw)
    history = tmp_path / "run" / "vae" / "history.jsonl"
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4]
    raw["stages"][0]["training"]["resume_from_checkpoint"] = str(tmp_path / "run" / "vae" / "checkpoints" / "checkpoint-2")
    train(raw, force_stages=("vae",))
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4]
    raw["stages"][0]["training"]["resume_from_checkpoint"] = None
    train(raw, force_stages=("vae",))  # from scratch: a new history
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4]


def test_report_takes_stage_folders_and_several_runs_and_names_bad_folders(compared, tmp_path, capsys):
    run_dir, _ = compared
    shutil.copytree(run_dir, tmp_path / "a" / "run", ignore=shutil.ignore_patterns("report", "cache", "checkpoints"))
    main(["report", str(run_dir), str(tmp_path / "a" / "run" / "ldm"), "--out", str(tmp_path / "out")])
    rows = [row[0] for row in table((tmp_path / "out" / "index.html").read_text(), "comparison")]
    assert rows == [f"run/{name}" for name in FAMILY_STAGES] + ["run-2/ldm"]
    with pytest.raises(SystemExit) as error:
        main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "out2")])
    assert f"{tmp_path / 'a'}: neither a trained stage folder (no done.json) nor a run folder" in str(error.value)


# --------------------------------------------------------------------------- in a browser


def render(page: Path) -> dict:
    """Open `page` in headless Chromium; what loaded and what went wrong."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: "
                                                                   "pip install -e '.[test]'")
    if CHROMIUM is None:
        pytest.skip("no Chromium: .ci/run installs Debian's `chromium` with apt-get; this machine could not")
    problems = []
    with sync_api.sync_playwright() as playwright:
        # The flags keep Chromium off the network it would otherwise try to reach at start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        tab = browser.new_page()
        tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
        tab.goto(page.as_uri())
        images = tab.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        rows = tab.locator("#comparison tbody tr").count()
        browser.close()
    return {"images": dict(images), "comparison_rows": rows, "problems": problems}


def test_the_report_renders_in_headless_chromium(compared, tmp_path):
    _, report = compared
    seen = render(report / "index.html")
    assert seen["problems"] == []
    assert len(seen["images"]) >= 2 * len(FAMILY_STAGES) and all(seen["images"].values())
    assert seen["comparison_rows"] == len(FAMILY_STAGES)
    # The same check on a copy missing one picture finds it: the test can fail.
    broken = shutil.copytree(report, tmp_path / "broken")
    (broken / "run-ldm-samples.png").unlink()
    seen = render(broken / "index.html")
    assert [src for src, loaded in seen["images"].items() if not loaded] == ["run-ldm-samples.png"]
    assert any("run-ldm-samples.png" in problem for problem in seen["problems"])
