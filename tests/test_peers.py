"""benchmarks/peers.py without the peers: the dataset layouts each peer reads, and the parsers
of tqdm redraws and GNU time -v reports, on fixed sample strings."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

TIME_V = """\tCommand being timed: "python train_network.py"
\tUser time (seconds): 201.31
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.45
\tAverage resident set size (kbytes): 0
\tMaximum resident set size (kbytes): 5242880
\tExit status: 0
"""


@pytest.fixture
def pairs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, caption in [("a.png", "a red circle"), ("b.jpg", 'a "quoted" square')]:
        (src / name).write_bytes(b"not decoded")
        (src / name).with_suffix(".txt").write_text(caption + "\n")
    (src / "notes.md").write_text("ignored")
    return peers.sample_pairs(src)


def test_sample_pairs_reads_images_and_stripped_captions(pairs):
    assert [(p.name, c) for p, c in pairs] == [("a.png", "a red circle"), ("b.jpg", 'a "quoted" square')]


def test_diffusers_imagefolder_has_metadata_and_no_captions_files(pairs, tmp_path):
    dest = peers.write_diffusers_layout(pairs, tmp_path / "d")
    lines = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
    assert lines == [{"file_name": "a.png", "text": "a red circle"}, {"file_name": "b.jpg", "text": 'a "quoted" square'}]
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "b.jpg", "metadata.jsonl"]


def test_kohya_layout_is_repeats_underscore_concept_with_txt_captions(pairs, tmp_path):
    dest = peers.write_kohya_layout(pairs, tmp_path / "k", repeats=3, concept="shapes")
    assert [p.name for p in dest.iterdir()] == ["3_shapes"]
    folder = dest / "3_shapes"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.jpg", "b.txt"]
    assert (folder / "b.txt").read_text().strip() == 'a "quoted" square'


def test_sdtune_layout_is_images_with_txt_captions(pairs, tmp_path):
    dest = peers.write_sdtune_layout(pairs, tmp_path / "s")
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.txt", "b.jpg", "b.txt"]
    assert (dest / "a.txt").read_text().strip() == "a red circle"


@pytest.mark.parametrize("line, desc, expected", [
    ("Steps:  40%|████      | 12/30 [00:07<00:09,  1.85it/s, lr=0.0001, step_loss=0.12]", "Steps",
     {"n": 12, "total": 30, "elapsed_s": 7, "s_per_it": 1 / 1.85}),
    ("steps: 100%|██████████| 10/10 [01:02:05<00:00, 12.50s/it, avr_loss=0.151]", "steps",
     {"n": 10, "total": 10, "elapsed_s": 3725, "s_per_it": 12.5}),
    ("training:   3%|▎         | 1/30 [00:00<?, ?step/s]", "training",
     {"n": 1, "total": 30, "elapsed_s": 0, "s_per_it": None}),
    ("training: 100%|##########| 30/30 [00:04<00:00,  6.71step/s]", None,
     {"n": 30, "total": 30, "elapsed_s": 4, "s_per_it": 1 / 6.71}),
])
def test_parse_tqdm(line, desc, expected):
    got = peers.parse_tqdm(line, desc)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value) if value is not None else got[key] is None


def test_parse_tqdm_rejects_other_bars_and_plain_lines():
    assert peers.parse_tqdm("caching latents: 100%|████| 40/40 [00:03<00:00, 12.1it/s]", "steps") is None
    assert peers.parse_tqdm("INFO epoch 1/3 step 12/30", None) is None


def test_parse_time_v():
    assert peers.parse_time_v(TIME_V) == {"peak_rss_mb": 5120.0, "time_wall_s": pytest.approx(3723.45)}


def test_step_times_from_timestamped_redraws():
    bar = lambda n, rate=None: {"n": n, "total": 5, "elapsed_s": 0, "s_per_it": rate}  # noqa: E731
    events = [(10.0, bar(0)), (12.0, bar(1)), (13.0, bar(3)), (15.0, bar(5, 0.9)), (15.5, bar(5, 0.8))]
    assert peers.step_times(events) == {"first_step_s": 12.0, "s_per_step": 0.75, "tqdm_s_per_step": 0.9}
    assert peers.step_times([(1.0, bar(0))])["s_per_step"] is None


def test_sdtune_summary_line():
    m = peers.SDTUNE_LINE.search("x\nsdtune: trained 30 steps in 12.3s (2.44 steps/s)\n")
    assert m.groups() == ("30", "12.3", "2.44")


def test_summary_ratios_are_sdtune_over_peer():
    runs = [{"trainer": "sdtune", "rc": 0, "wall_s": 10, "first_step_s": 4, "s_per_step": 0.5, "tqdm_s_per_step": 0.5, "peak_rss_mb": 300},
            {"trainer": "kohya", "rc": 0, "wall_s": 20, "first_step_s": 2, "s_per_step": 1.0, "tqdm_s_per_step": 1.0, "peak_rss_mb": 600},
            {"trainer": "kohya", "rc": 1, "wall_s": 1}]
    medians, ratios = peers.summarise(runs, ["sdtune", "kohya"])
    assert medians["kohya"]["runs_ok"] == "1/2"
    assert ratios["kohya"] == {"steps_per_s": 2.0, "peak_rss": 0.5, "first_step": 2.0, "wall": 0.5}
    assert "| kohya | 1/2 |" in peers.markdown(medians, ratios)


@pytest.mark.skipif(not Path("/usr/bin/time").is_file(), reason="needs GNU time")
def test_run_timed_stamps_each_redraw_when_it_arrives(tmp_path):
    # tqdm begins each redraw with \r, so a redraw is complete before its line ends
    script = ("import sys, time\n"
              "for n in range(3):\n"
              "    sys.stderr.write(f'\\rtraining: {n * 50}%|#| {n}/2 [00:00<00:00, 4.00step/s]'); sys.stderr.flush()\n"
              "    time.sleep(0.3 if n < 2 else 0.6)\n"
              "sys.stderr.write('\\n')\n")
    result = peers.run_timed([sys.executable, "-c", script], dict(os.environ), tmp_path, tmp_path / "log.txt", "training")
    assert result["rc"] == 0 and result["peak_rss_mb"] > 0
    assert result["s_per_step"] == pytest.approx(0.3, abs=0.1)
    assert result["first_step_s"] < result["wall_s"] - 0.2
    assert result["tqdm_s_per_step"] == 0.25


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_mixed_precision_reaches_all_three_trainers(tmp_path, precision):
    args = peers.argparse.Namespace(steps=3, batch_size=1, resolution=256, learning_rate=1e-4, mixed_precision=precision,
                                    peers_python="py", kohya_python=None, diffusers_example=tmp_path / "ex.py",
                                    kohya=tmp_path / "sd-scripts")
    data = {"sdtune": tmp_path / "s", "diffusers": tmp_path / "d", "kohya": tmp_path / "k", "kohya_tokenizer": tmp_path / "t"}
    cmds = {name: cmd for name, (cmd, _) in peers.commands(args, tmp_path / "model", data, tmp_path / "out").items()}
    assert f"train.mixed_precision={precision}" in cmds["sdtune"]
    for peer in ("diffusers", "kohya"):
        flag = cmds[peer].index("--mixed_precision")
        assert cmds[peer][flag + 1] == precision
