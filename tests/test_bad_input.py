"""Bad input, across every entry point: `apt-ray train / profile / pretrain / sweep` and the sweep scripts.

Each case runs the real ``main()`` in-process and must give exit code 2, one
clear message naming the problem (no traceback), and leave nothing behind: no
``--json-out`` file, no sweep directory, no MLflow database. Cases that need a
Ray cluster or a server (unreachable Ray address or MLflow URI, resources the
cluster cannot provide) are in test_sweep_cli.py, test_ray_train.py and
test_sweep_integration.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from apt_ray.cli import main as apt_ray_main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = ROOT / "studies" / "configs" / "default_meter.yaml"
TRAIN = ["--model", "tiny-vilt", "pretrained=false"]

FILES = {
    "list.yaml": "- lr\n- epochs\n",
    "broken.yaml": "lr: [1e-3\n",
    "scalar.yaml": "just a string\n",
    "zero_trials.yaml": "name: zero\nnum_trials: 0\n",
    "nolabel.csv": "image,category\na.png,0\n",  # read as a one-split dataset by `data=hf data_path=.`
}

# (entry point, arguments, what the message must say)
CASES: list[tuple[str, list[str], str]] = [
    # config files that are not YAML mappings
    ("train", ["--config", "list.yaml"], "holds a list, not a mapping"),
    ("train", ["--config", "scalar.yaml"], "holds a str, not a mapping"),
    ("train", ["--config", "broken.yaml"], "is not valid YAML"),
    ("train", ["--config", "missing.yaml"], "does not exist"),
    ("sweep", ["--config", "list.yaml"], "holds a list, not a mapping"),
    ("sweep", ["--config", "broken.yaml"], "is not valid YAML"),
    # wrong types
    ("train", ["lr=fast"], "lr='fast': input should be a valid number"),
    ("train", ["epochs=three"], "epochs='three': input should be a valid integer"),
    ("sweep", ["fixed.lr=fast"], "lr='fast': input should be a valid number"),
    ("sweep", ["concurrency=two"], "concurrency='two'"),
    # zero or negative learning rates, epochs, batch sizes, trial counts
    ("train", ["lr=0"], "lr=0: input should be greater than 0"),
    ("train", ["lr=-1e-3"], "lr='-1e-3': input should be greater than 0"),
    ("train", ["--epochs", "0"], "epochs=0"),
    ("train", ["batch_size=-8"], "batch_size=-8"),
    ("train", ["--workers", "0"], "--workers 0 is not allowed"),
    ("train", ["--workers", "2", "--max-failures", "-2"], "--max-failures -2 is not allowed"),
    ("sweep", ["fixed.lr=-1"], "lr=-1: input should be greater than 0"),
    ("sweep", ["fixed.epochs=0"], "epochs=0"),
    ("sweep", ["--max-epochs", "0"], "--max-epochs 0 is not allowed"),
    ("sweep", ["fixed.batch_size=0"], "batch_size=0"),
    ("sweep", ["--num-samples", "0"], "--num-samples 0 is not allowed"),
    ("sweep", ["--config", "zero_trials.yaml"], "num_trials=0"),
    ("sweep", ["concurrency=0"], "concurrency=0"),
    ("sweep", ["--workers-per-trial", "0"], "--workers-per-trial 0 is not allowed"),
    ("profile", ["--num-prompts", "0"], "num_prompts=0"),
    ("profile", ["--text-len", "0"], "--text-len 0 is not allowed"),
    ("pretrain", ["--steps", "0"], "--steps 0 is not allowed"),
    # unknown keys, with a did-you-mean
    ("train", ["num_promtps=3"], "unknown key 'num_promtps' (did you mean 'num_prompts'?)"),
    ("sweep", ["num_trails=3"], "unknown key 'num_trails' (did you mean 'num_trials'?)"),
    ("sweep", ["fixed.num_promtps=3"], "unknown key 'num_promtps' (did you mean 'num_prompts'?)"),
    ("sweep", ["resources.cpus_per_workr=2"], "did you mean 'cpus_per_worker'?"),
    # unknown names
    ("train", ["--method", "prefix"], "method"),
    ("profile", ["--model", "nope"], "unknown model 'nope'"),
    ("profile", ["--method", "prefix"], "unknown method 'prefix'"),
    ("profile", ["--placement", "middle"], "placement='middle'"),
    ("pretrain", ["--model", "tiny-vit"], "unknown model 'tiny-vit'"),
    ("pretrain", ["--model", "vilt-b32"], "builds the tiny presets only"),
    # search bounds and settings outside the model's limits
    ("profile", ["--model", "tiny-vilt", "--depth", "9"], "depth 9 is out of range"),
    ("profile", ["--model", "tiny-vilt", "--rank", "100000"], "rank 100000 is above the hidden size 128"),
    ("train", ["depth=99"], "depth 99"),
    ("sweep", ["search_space.depth={type: int, low: 1, high: 12}"], "depth 12 is above the 4 layers"),
    ("sweep", ["search_space.rank={type: int, low: 1, high: 100}", "search_space.num_prompts={type: int, low: 1, high: 4}"],
     "rank 100 is above the hidden size 64"),
    # missing data paths and checkpoints
    ("train", ["data=vqav2_arrow", "data_path=/nonexistent/vqa"], "/nonexistent/vqa does not exist"),
    ("train", ["resume_from=/nonexistent/run"], "holds no checkpoint"),
    ("sweep", ["data=vqav2_arrow", "fixed.pretrained=false", "fixed.data_path=/nonexistent/vqa"],
     "fixed.data_path /nonexistent/vqa does not exist"),
    ("sweep", ["data=hf", "fixed.pretrained=false"], "data=hf needs fixed.data_path"),
    ("train", ["--model", "tiny-clip", "task=classification", "data=hf", "data_path=."], "has no 'label' column"),
    # preprocessing sources, recipes and layouts
    ("train", ["recipe=apt-vilt-vq"], "unknown recipe 'apt-vilt-vq' (did you mean 'apt-vilt-vqa'?)"),
    ("sweep", ["fixed.recipe=embeded"], "unknown recipe 'embeded' (did you mean 'embedded'?)"),
    ("train", ["--model", "tiny-meter", "checkpoint=/nonexistent/meter.ckpt"], "holds no tokenizer: pass tokenizer=roberta-base"),
    ("train", ["tokenizer=/nonexistent/tokenizer"], "tokenizer='/nonexistent/tokenizer'"),
    ("train", ["image_processor=/nonexistent/processor"], "image_processor='/nonexistent/processor'"),
    ("train", ["sites=cross"], "sites=cross: this backbone has no cross-attention sites"),
    ("profile", ["--model", "tiny-vilt", "--sites", "cross"], "sites=cross: this backbone has no cross-attention sites"),
    ("profile", ["--train-extras", "pooler,prompts"], "train_extras"),
    # --resume with no earlier sweep at that path
    ("sweep", ["--resume", "--storage-path", "no_sweep_here"], "no earlier sweep at"),
    # input shapes the backbone cannot take, refused before it is built
    ("profile", ["--image-size", "0x0"], "--image-size 0x0 is not allowed: give a height and width that are positive multiples of tiny-meter's patch size 8"),
    ("profile", ["--model", "tiny-vilt", "--image-size", "60x64"], "--image-size 60x64 is not allowed"),
    ("profile", ["--model", "vilt-b32", "--image-size", "384x600"], "positive multiples of vilt-b32's patch size 32"),
    ("profile", ["--model", "tiny-vilt", "--text-len", "25"], "--text-len 25 is not allowed: tiny-vilt takes at most 24 text tokens"),
    ("profile", ["--model", "tiny-meter", "--text-len", "26"], "tiny-meter takes at most 25 text tokens"),
    ("train", ["max_text_len=40"], "max_text_len=40 is above the 24 text tokens tiny-vilt takes"),
    ("sweep", ["fixed.max_text_len=100000"], "max_text_len=100000 is above the"),
    # closed sets, refused while parsing with the allowed values
    ("train", ["--data", "hff"], "data='hff' is not allowed (did you mean 'hf'?): choose one of synthetic, arrow, vqav2_arrow, hf"),
    ("profile", ["--sites", "both"], "sites='both' is not allowed"),
    ("train", ["--method", "aptt"], "unknown method 'aptt' (did you mean 'apt'?)"),
    # tracking stores apt_ray cannot log to
    ("sweep", ["--tracking-uri", "ftp://x"], "unsupported scheme 'ftp': use sqlite:///path.db"),
    ("sweep", ["--tracking-uri", "s3://bucket/runs"], "http:// or https:// (an MLflow tracking server), or databricks"),
    # a trial setting given as a study key
    ("sweep", ["num_prompts=32"], "give fixed.num_prompts=32 to set it for every trial, or search_space.num_prompts={type: int"),
    ("sweep", ["placement=top"], "fixed.placement=top"),
    # epoch counts above the sanity limit
    ("train", ["epochs=1000000000"], "epochs=1000000000: input should be less than or equal to 10000"),
    ("train", ["--epochs", "1000000000"], "less than or equal to 10000"),
    ("sweep", ["fixed.epochs=1000000000"], "epochs=1000000000: input should be less than or equal to 10000"),
    ("sweep", ["--max-epochs", "1000000000"], "--max-epochs 1000000000 is not allowed: the limit is 10000 epochs per trial"),
    # prompt pruning: a keep ratio outside (0, 1], or a method without prompts to prune
    ("train", ["prune_keep=1.5"], "prune_keep=1.5: input should be less than or equal to 1"),
    ("train", ["prune_keep=0"], "prune_keep=0: input should be greater than 0"),
    ("train", ["--method", "lora", "prune_keep=0.5"], "method 'lora' has no prompts to prune"),
    ("train", ["--method", "kv_prompt", "num_prompts=6", "prune_keep=0.5", "prune_mode=segment"],
     "cannot split num_prompts=6 into equal segments"),
    ("profile", ["--prune-keep", "2"], "prune_keep=2.0: input should be less than or equal to 1"),
    ("profile", ["--method", "adapter", "--prune-keep", "0.5"], "method 'adapter' has no prompts to prune"),
    ("sweep", ["fixed.prune_keep=-0.5"], "prune_keep=-0.5: input should be greater than 0"),
    ("sweep", ["search_space.prune_keep={type: float, low: 0.0, high: 1.0}"], "the bound 0.0 is not a valid prune_keep"),
    # image-text retrieval: re-ranking needs unimodal [CLS] states (tiny-vilt has none); a missing arrow folder
    ("train", ["task=retrieval", "rerank_top_k=3", "max_train_questions=8", "max_val_questions=4"],
     "rerank_top_k=3 ranks candidates by the backbone's unimodal [CLS] states"),
    ("train", ["task=retrieval", "data=arrow", "data_path=/nonexistent/f30k"], "retrieval arrow folder /nonexistent/f30k does not exist"),
    # NLVR2: a missing arrow folder; an unknown task name for the profile
    ("train", ["task=nlvr2", "data=arrow", "data_path=/nonexistent/nlvr2"], "NLVR2 arrow folder /nonexistent/nlvr2 does not exist"),
    ("profile", ["--task", "nlvr"], "task='nlvr' is not allowed"),
    # the pointer to the help names the command
    ("train", ["lr=fast"], "(see `apt-ray train --help`)"),
    ("sweep", ["concurrency=two"], "(see `apt-ray sweep --help`)"),
]
# "sweep": what the study scripts run (`apt-ray sweep` with their default study); "apt-ray sweep": on its own
CASES += [("apt-ray sweep", args, needle) for entry, args, needle in CASES if entry == "sweep"]


def run(entry: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if entry == "sweep":
        argv = ["sweep", "--study-default", str(DEFAULT_STUDY), *args]
    elif entry == "apt-ray sweep":
        argv = ["sweep", *args]
    else:
        argv = [entry, *(TRAIN if entry == "train" else []), *args]
    return apt_ray_main(argv), capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("entry,args,needle", CASES, ids=[f"{e}:{' '.join(a)}"[:60] for e, a, _ in CASES])
def test_bad_input_is_refused_cleanly(entry: str, args: list[str], needle: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    before = set(tmp_path.iterdir())
    extra = ["--json-out", str(tmp_path / "out.json"), f"output_dir={tmp_path / 'out'}"] if entry == "train" else []
    code, err = run(entry, [*args, *extra], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one paragraph
    assert needle in lines[0], err
    assert lines[0].startswith(f"apt-ray {entry.removeprefix('apt-ray ')}: error: ")
    assert set(tmp_path.iterdir()) == before, "a refused command left files behind"


def _hf_dataset(root: Path, rows: int, bad: set[int], val_rows: int | None = None) -> Path:
    """A saved `datasets` folder with PNG images, some of them undecodable bytes."""
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value
    from PIL import Image

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (i * 7 % 255, 40, 90)).save(buf, format="PNG")
        return buf.getvalue()

    def split(n: int) -> Dataset:
        data = {"image": [{"bytes": b"not an image" if i in bad else png(i), "path": None} for i in range(n)],
                "question": ["what color is the square?"] * n, "answers": [["red"] * 10 if i % 2 else ["blue"] * 10 for i in range(n)]}
        features = Features({"image": ImageFeature(), "question": Value("string"), "answers": List(Value("string"))})
        return Dataset.from_dict(data, features=features)

    DatasetDict({"train": split(rows), "val": split(rows if val_rows is None else val_rows)}).save_to_disk(
        str(root), num_shards={"train": 1, "val": 1})
    return root


def test_bad_data_through_apt_ray_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty split, and a set where too many images cannot be decoded: exit 2, one error line, no result file."""
    base = ["train", *TRAIN, "data=hf", "epochs=1", "batch_size=8", "image_size=16", f"output_dir={tmp_path / 'out'}"]
    out = tmp_path / "out.json"

    empty = _hf_dataset(tmp_path / "empty", rows=8, bad=set(), val_rows=0)
    broken = _hf_dataset(tmp_path / "broken", rows=40, bad=set(range(0, 40, 3)))
    capsys.readouterr()  # the datasets' own progress bars
    assert apt_ray_main([*base, f"data_path={empty}", "--json-out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and "has no questions" in error_lines(err)[0], err

    assert apt_ray_main([*base, f"data_path={broken}", "--json-out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and "could not be decoded" in error_lines(err)[0], err
    assert not out.exists()


def _break(rows: dict, column: str, how: str) -> None:
    """Drop ``column`` (``how == "drop"``) or empty its first row (``"empty"``) in a column mapping of rows."""
    if how == "drop":
        del rows[column]
    else:
        rows[column][0] = b"" if column == "image" else None


# (task, its arrow files' writer in the tests, the validation split, the column and how it is broken, what the
# message must say): files in the ViLT/METER layout whose validation split is broken
ARROW_CASES = [
    ("retrieval", "tests.test_retrieval:f30k_rows:write_f30k", "val", "caption", "drop",
     "lacks the column(s) caption that image-text retrieval reads"),
    ("retrieval", "tests.test_retrieval:f30k_rows:write_f30k", "val", "image", "empty",
     "has captions but no image bytes in 1 of its 2 rows"),
    ("nlvr2", "tests.test_nlvr2:nlvr2_rows:write_nlvr2", "dev", "answers", "drop", "lacks the columns answers"),
    ("nlvr2", "tests.test_nlvr2:nlvr2_rows:write_nlvr2", "dev", "image_1", "empty", "has no image_1"),
]


@pytest.mark.parametrize("task,writer,split,column,how,needle", ARROW_CASES, ids=[f"{c[0]}:{c[3]}" for c in ARROW_CASES])
def test_bad_task_arrow_through_apt_ray_train(task: str, writer: str, split: str, column: str, how: str, needle: str,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    module, rows_of, write = writer.split(":")
    mod = importlib.import_module(module)
    data = tmp_path / task
    getattr(mod, write)(data, "train", getattr(mod, rows_of)(2, "train"))
    rows = getattr(mod, rows_of)(2, split)
    _break(rows, column, how)
    getattr(mod, write)(data, split, rows)
    before = set(tmp_path.iterdir())
    out = tmp_path / "out.json"
    code = apt_ray_main(["train", *TRAIN, f"task={task}", "data=arrow", f"data_path={data}", f"output_dir={tmp_path / 'out'}",
                         "--json-out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(error_lines(err)) == 1 and needle in error_lines(err)[0], err
    assert set(tmp_path.iterdir()) == before
