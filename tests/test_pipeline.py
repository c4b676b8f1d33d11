"""`edgekd run` on your own models and data (torchvision, Python files, image folders, torchvision's file layouts), recipes
with per-stage settings, bad recipes as one line, and the closing summary; run as a user would, offline."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EDGEKD = shutil.which("edgekd") or str(Path(sys.executable).parent / "edgekd")


def edgekd(*args, cwd=None, timeout=1200):
    return subprocess.run([EDGEKD, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def write_image_folder(root, n_per_class=7, size=(12, 10), mode="L", splits=("train", "test"), seed=0):
    "Tiny random PNGs in torchvision's ImageFolder layout: root/SPLIT/CLASS/i.png, three classes."
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in ("cat", "dog", "owl"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                a = rng.integers(0, 256, (size[1], size[0]) + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
                Image.fromarray(a, mode).save(root / split / c / f"{i}.png")
    return root


MODEL_FILE = """import torch.nn as nn
def make_model(input_shape, n_classes, width=16):
    n = 1
    for s in input_shape: n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, n_classes))
def three_classes(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
"""


def test_torchvision_teacher_and_student_on_an_image_folder(tmp_path):
    pets, out = write_image_folder(tmp_path / "pets", mode="RGB"), tmp_path / "run"
    r = edgekd("run", "--dataset", f"imagefolder:{pets}", "--teacher", "torchvision:resnet18",
               "--student", "torchvision:mobilenet_v3_small", "--epochs", "1", "--batch-size", "8", "--out", str(out),
               "--arm-check", "off", "--no-runtime-latency")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["config"]["teacher"], report["config"]["student"]) == ("torchvision:resnet18", "torchvision:mobilenet_v3_small")
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", "student", "student_kd"]
    import torch
    import torchvision
    # random init, classifier head sized to the 3 classes: same parameter count as torchvision's own builder + the 1x1 adapter
    # (RGB input: no adapter)
    assert rows["teacher"]["params"] == sum(p.numel() for p in torchvision.models.resnet18(num_classes=3).parameters())
    assert rows["student"]["params"] == sum(p.numel() for p in torchvision.models.mobilenet_v3_small(num_classes=3).parameters())
    assert report["final"]["model"] == "student_kd" and report["export"][0]["model"] == "student_kd"
    assert {e["artifact"] for e in report["export"]} >= {"pytorch", "onnx", "tflite"}
    import edgekd.models as models
    m = models.load_model(out / "weights" / "student_kd.pt")   # an exported program: the file alone rebuilds it
    with torch.no_grad(): assert m(torch.zeros(1, 3, 10, 12)).shape == (1, 3)
    assert "[1/4] teacher done in" in r.stdout and "report:" in r.stdout


def test_grayscale_images_and_a_model_from_a_python_file(tmp_path):
    pets, out = write_image_folder(tmp_path / "pets", splits=("train", "val", "test")), tmp_path / "run"
    (tmp_path / "nets.py").write_text(MODEL_FILE)
    r = edgekd("run", "--dataset", f"imagefolder:{pets}", "--teacher", "torchvision:mobilenet_v3_small",
               "--student", f"{tmp_path / 'nets.py'}:make_model", "--epochs", "1", "--batch-size", "8", "--image-size", "16",
               "--out", str(out), "--no-export", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["student"]["params"] == (16 * 16 * 16 + 16) + (16 * 3 + 3)    # make_model(input_shape=(1, 16, 16), n_classes=3)
    # a val folder is the validation split: 21 images per split, none held out of train
    from edgekd.pipeline import image_folder_loaders
    d = image_folder_loaders(pets, image_size=16)
    assert (len(d.train.dataset), len(d.valid.dataset), len(d.test.dataset), d.input_shape) == (21, 21, 21, (1, 16, 16))


def test_torchvision_mnist_files_by_class_name(tmp_path):
    from edgekd.data import write_idx_mnist
    write_idx_mnist(tmp_path / "data", n_train=60, n_test=20)
    out = tmp_path / "run"
    r = edgekd("run", "--dataset", "torchvision:MNIST", "--data-root", str(tmp_path / "data"), "--teacher", "torchvision:resnet18",
               "--student", "dscnn", "--epochs", "1", "--out", str(out), "--no-export", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["teacher", "student", "student_kd"]
    import torchvision
    # resnet18 from torchvision, random init, head sized to 10 classes, plus the learned 1x1 grey-to-RGB adapter (1*3 + 3)
    assert report["rows"][0]["params"] == sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters()) + 6
    assert report["rows"][0]["macs"] > 50 * report["rows"][1]["macs"]


def test_recipe_sets_epochs_and_lr_per_stage(tmp_path):
    (tmp_path / "r.toml").write_text('''stages = [
  {name = "teacher", epochs = 3, lr = 0.01},
  {name = "student", model = "mlp", kwargs = {widths = [16]}, epochs = 1},
  {name = "distill", epochs = 2},
]''')
    out = tmp_path / "run"
    r = edgekd("run", "--dataset", "digits", "--epochs", "5", "--recipe", str(tmp_path / "r.toml"), "--out", str(out), "--no-export")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["stage_settings"] == {"teacher": {"epochs": 3, "lr": 0.01}, "student": {"epochs": 1, "lr": 0.003},
                                        "distill": {"epochs": 2, "lr": 0.003}}
    assert r.stdout.count("epoch 3/3") == 1 and r.stdout.count("epoch 1/1") == 1 and r.stdout.count("epoch 2/2") == 1
    assert report["rows"][1]["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert "teacher: 3 epochs, lr 0.01" in (out / "report.md").read_text()


@pytest.mark.parametrize("text, message, code", [
    ('stages = [{name = "teacher"}, {name = "sharpen"}]', "unknown stage 'sharpen'; choose one of", 2),
    ('stages = [{name = "student"}, {name = "quantize", mode = "ptq"}, {name = "prune", sparsity = 0.5}]',
     "stage 'prune' cannot come after 'quantize'", 2),
    ('stages = [{name = "distill"}, {name = "teacher"}]', "stage 'distill' needs one of teacher before it", 2),
    (None, "no such file", 2),
    ('stages = [{name = "teacher", epochs = 0}]', "epochs of stage 'teacher' must be > 0, got 0", 2),
    ('stages = [{name = "teacher", model = "torchvision:resnet18"}]', "torchvision:resnet18 takes images of shape (channels, height, width)", 1),
    ('stages = [{name = "student", model = "NETS:three_classes"}]', "student outputs shape (3,) per sample, but dataset 'digits' has 10 classes", 1),
    ('stages = [{name = "student", model = "NETS:make_model", kwargs = {depth = 3}}]', "unexpected keyword argument 'depth'", 2),
])
def test_bad_recipe_is_one_line_and_leaves_no_output(tmp_path, text, message, code):
    (tmp_path / "nets.py").write_text(MODEL_FILE)
    dataset = "digits" if "NETS" in (text or "") else "mnist1d"
    if text is not None: (tmp_path / "r.toml").write_text(text.replace("NETS", str(tmp_path / "nets.py")))
    r = edgekd("run", "--dataset", dataset, "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"))
    err = r.stderr.strip()
    assert r.returncode == code and "\n" not in err and err.startswith("edgekd: error: "), (r.returncode, err)
    assert message in err, err
    assert not (tmp_path / "run").exists()
    assert "done in" not in r.stdout   # refused before any stage ran


def test_python_call_on_your_own_tensors(tmp_path):
    import torch
    from sklearn.datasets import load_digits
    from edgekd.data import from_tensors
    from edgekd.models import get_model
    from edgekd.pipeline import run_pipeline
    d = load_digits()
    x, y = torch.tensor(d.images[:, None] / 16, dtype=torch.float32), torch.tensor(d.target)
    dls = from_tensors(x[:1400], y[:1400], x[1400:], y[1400:], name="my-digits")
    lines = []
    report = run_pipeline(dls=dls, teacher=get_model("cnn", (1, 8, 8), 10), student=get_model("mlp", (1, 8, 8), 10, widths=(32,)),
                          epochs=3, out=tmp_path / "run", export=False, progress=False, log=lines.append)
    assert report["config"]["dataset"] == "my-digits" and [r["name"] for r in report["rows"]] == ["teacher", "student", "student_kd"]
    assert report["rows"][0]["test_accuracy"] > 0.5
    assert lines[-1].splitlines()[1].strip().startswith("report:")


def test_summary_names_the_install_command_when_arm_tools_are_missing(tmp_path, monkeypatch, capsys):
    import edgekd.arm as arm
    from edgekd.cli import main
    from edgekd.pipeline import ARM_INSTALL

    def missing(*a, **k): raise arm.ArmToolsError("qemu-aarch64 >= 8.1 not found")
    monkeypatch.setattr(arm, "emulator_ready", lambda *a, **k: False)
    monkeypatch.setattr(arm, "find_tools", missing)
    code = main(["run", "--dataset", "digits", "--epochs", "5", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    # --quiet silences progress; the report keeps the verdict and the command
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["arm"]["fix"] == ARM_INSTALL == "sudo bash scripts/install_arm_tools.sh"
    from edgekd.pipeline import summary_lines
    report["out"] = str(tmp_path / "run")
    lines = summary_lines(report)
    assert lines[-1] == "ARM check:   skipped, qemu-aarch64 >= 8.1 and debootstrap are not installed; run: sudo bash scripts/install_arm_tools.sh"
    assert lines[0].startswith(f"report:      {tmp_path / 'run'}/report.md")
    assert "ARM64 check: skipped" in (tmp_path / "run" / "report.md").read_text()
