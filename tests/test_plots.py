"""fastcl.plots and ``python -m fastcl.evaluate --runs``: training logs read into
trajectories, the alignment-uniformity and spectrum plots, and their errors (synthetic
run directories; nothing is trained or encoded)."""

import json

import pytest

from fastcl import plots
from fastcl.evaluate import main


def _write_run(directory, trajectory, kept=None, before_spectrum=(1.0, 0.5, 0.1), after_spectrum=(1.0, 0.7, 0.3),
               results=True, extra_records=()):
    """A run directory as the trainer writes it: ``trajectory`` is [(step, event, align, uniform)]."""
    directory.mkdir(parents=True)
    records = []
    for step, event, a, u in trajectory:
        r = {"event": event, "step": step, "alignment": a, "uniformity": u, "stsb_dev": 80.0 + step}
        if step == 0:
            r["when"] = "before"
        records.append(r)
        records.append({"event": "train", "step": step + 1, "loss": 0.1, "lr": 1e-5})  # no geometry: ignored
    records += list(extra_records)
    if kept is not None:
        records.append({"event": "eval", "step": trajectory[-1][0], "when": "after (best model)",
                        "best_step": kept[0], "alignment": kept[1], "uniformity": kept[2], "stsb_dev": 90.0})
    (directory / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if results:
        (directory / "results.json").write_text(json.dumps({
            "steps": trajectory[-1][0], "best_step": kept[0] if kept else None,
            "before": {"stsb_dev": 80.0, "stsb_test": 78.0, "alignment": trajectory[0][2],
                       "uniformity": trajectory[0][3]},
            "after": {"stsb_dev": 90.0, "stsb_test": 85.0, "alignment": kept[1] if kept else None,
                      "uniformity": kept[2] if kept else None},
            "spectrum_normalized": {"before": list(before_spectrum), "after": list(after_spectrum)}}))
    return directory


TRAJ = [(0, "eval", 0.30, -3.0), (2, "geometry", 0.32, -3.2), (4, "eval", 0.33, -3.4), (6, "geometry", 0.35, -3.5),
        (8, "eval", 0.36, -3.6)]


def test_load_run_reads_the_trajectory_in_step_order(tmp_path):
    run = plots.load_run(_write_run(tmp_path / "a", TRAJ, kept=(4, 0.33, -3.4)))
    assert run.label == "a" and [p["step"] for p in run.points] == [0, 2, 4, 6, 8]
    assert [(p["alignment"], p["uniformity"]) for p in run.points] == [(a, u) for _, _, a, u in TRAJ]
    assert run.points[1]["stsb_dev"] == 82.0
    assert run.kept["best_step"] == 4 and run.kept["alignment"] == 0.33
    assert run.spectra == {"before": [1.0, 0.5, 0.1], "after": [1.0, 0.7, 0.3]}
    # the log file itself, and a label
    run = plots.load_run(f"mine={tmp_path / 'a' / 'log.jsonl'}")
    assert run.label == "mine" and len(run.points) == 5


def test_a_step_logged_again_after_resume_keeps_the_later_record(tmp_path):
    again = {"event": "geometry", "step": 2, "alignment": 0.5, "uniformity": -1.0}
    run = plots.load_run(_write_run(tmp_path / "a", TRAJ, extra_records=[again]))
    assert [p["step"] for p in run.points] == [0, 2, 4, 6, 8] and run.points[1]["alignment"] == 0.5


def test_run_spec_with_an_equals_sign(tmp_path):
    odd = _write_run(tmp_path / "lr=3e-5", TRAJ)
    assert plots.parse_run_spec(str(odd)) == (None, odd)  # an existing path is never split
    assert plots.parse_run_spec(f"x={odd}") == ("x", odd)
    assert plots.load_run(str(odd)).label == "lr=3e-5"


def test_load_run_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="no log.jsonl"):
        plots.load_run(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "log.jsonl").write_text('{"event": "eval", "step": 0, "alignment": 0.1, "uniformity": -2}\n{"event": \n')
    with pytest.raises(ValueError, match=r"bad/log.jsonl:2: not a JSON record"):
        plots.load_run(bad)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "log.jsonl").write_text('{"event": "train", "step": 1, "loss": 0.3}\n')
    with pytest.raises(ValueError, match="--geometry-steps"):
        plots.load_run(plain)


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def test_alignment_uniformity_plot_draws_each_trajectory(tmp_path, captured):
    a = plots.load_run(_write_run(tmp_path / "a", TRAJ, kept=(4, 0.33, -3.4)))
    other = [(0, "eval", 0.30, -3.0), (5, "geometry", 0.28, -3.1), (10, "eval", 0.27, -3.3)]
    b = plots.load_run(_write_run(tmp_path / "b", other))
    out = plots.plot_alignment_uniformity([a, b], tmp_path / "au.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    ax = captured[0].axes[0]
    lines = [(list(line.get_xdata()), list(line.get_ydata()), line.get_color(), line.get_marker()) for line in ax.lines]
    paths = [ln for ln in lines if ln[3] in ("None", None, "")]
    assert [p[:2] for p in paths] == [([x for _, _, x, _ in TRAJ], [y for _, _, _, y in TRAJ]),
                                      ([x for _, _, x, _ in other], [y for _, _, _, y in other])]
    assert paths[0][2] != paths[1][2]  # one color per run
    starts = [ln for ln in lines if ln[3] == "o"]
    ends = [ln for ln in lines if ln[3] == "s"]
    stars = [ln for ln in lines if ln[3] == "*"]
    assert [s[:2] for s in starts] == [([0.30], [-3.0]), ([0.30], [-3.0])]
    assert [e[:2] for e in ends] == [([0.36], [-3.6]), ([0.27], [-3.3])]
    assert [s[:2] for s in stars] == [([0.33], [-3.4])]  # only run a has a final-model record
    assert len([c for c in ax.texts if c.arrow_patch is not None]) == 4 + 2  # one arrow per move along training
    assert ax.get_xlabel().startswith(r"$\ell_{align}$") and ax.get_ylabel().startswith(r"$\ell_{uniform}$")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["a", "b"] and "start (before training)" in labels


def test_spectra_plot_shares_one_before_line_per_starting_point(tmp_path, captured):
    runs = [plots.load_run(_write_run(tmp_path / name, TRAJ, before_spectrum=before, after_spectrum=after))
            for name, before, after in (("a", (1, 0.5, 0.1), (1, 0.6, 0.2)), ("b", (1, 0.5, 0.1), (1, 0.7, 0.3)),
                                        ("c", (1, 0.2, 0.01), (1, 0.4, 0.05)))]
    plots.plot_spectra_before_after(runs, tmp_path / "s.png")
    ax = captured[0].axes[0]
    labelled = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert labelled == {"before (a and b)": [1, 0.5, 0.1], "before (c)": [1, 0.2, 0.01], "after: a": [1, 0.6, 0.2],
                        "after: b": [1, 0.7, 0.3], "after: c": [1, 0.4, 0.05]}
    assert ax.get_yscale() == "log"
    ratios = {line.get_label(): list(line.get_ydata()) for line in captured[0].axes[1].lines
              if not line.get_label().startswith("_")}  # the unlabelled line is the reference at 1
    assert ratios == {"a": pytest.approx([1, 1.2, 2]), "b": pytest.approx([1, 1.4, 3]), "c": pytest.approx([1, 2, 5])}


def test_cli_runs_table_and_plots(tmp_path, capsys):
    a = _write_run(tmp_path / "a", TRAJ, kept=(4, 0.33, -3.4))
    b = _write_run(tmp_path / "b", TRAJ)
    au, spectra = tmp_path / "figs" / "au.png", tmp_path / "figs" / "spectra.png"
    assert main(["--runs", str(a), f"second={b}", "--plot", str(au), "--plot-spectra", str(spectra)]) == 0
    out = capsys.readouterr().out
    assert "| a | 8 (best 4) | 80.00 -> 90.00 | 78.00 -> 85.00 | 0.3000 -> 0.3300 |" in out
    assert "| second | 8 |" in out and f"alignment-uniformity plot: {au}" in out
    assert au.read_bytes()[:4] == b"\x89PNG" and spectra.read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_errors(tmp_path, capsys):
    a = _write_run(tmp_path / "a", TRAJ)
    assert main(["--runs", str(a), str(tmp_path / "nope"), "--plot", str(tmp_path / "p.png")]) == 2
    assert "nope: no log.jsonl" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    unfinished = _write_run(tmp_path / "unfinished", TRAJ, results=False)
    assert main(["--runs", str(unfinished), "--plot-spectra", str(tmp_path / "s.png")]) == 2
    assert "no run has spectra" in capsys.readouterr().err
    assert main(["--runs", str(unfinished), "--plot", str(tmp_path / "au.png")]) == 0  # the log is enough
    for argv, message in ((["--runs", str(a), "--model", "x"], "one or the other"),
                          (["--plot-spectra", str(tmp_path / "s.png")], "it needs --runs")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert main(["--runs", str(a), "--plot", str(tmp_path)]) == 2  # a directory, not a file
    assert "is a directory" in capsys.readouterr().err
