"""The logged MLflow model serves: `mlflow models serve` on 127.0.0.1 answers a POSTed image with the task's records,
and a bad request (wrong schema, undecodable image) gets HTTP 400 with a message and no traceback.

One tiny run per task (resnet18 from random init, one epoch, 32-64 px) logs its model to a sqlite store. The four
servers start together: starting one (imports, model load) is most of this file's time.
"""
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from loopback import free_port, port_open
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import tracking
from pipeline.data import synth_coco, synth_faces
from pipeline.train import checkpoint, runner

TASKS = ("classification", "detection", "segmentation", "face")
RESNET18 = {"name": "resnet18", "weights": "none"}
EMBEDDING_DIM = 16
DETECTOR = {"backbone": RESNET18, "frozen_bn": False, "min_size": 64, "max_size": 64,
            "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32, "representation_size": 128,
            "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}
SERVER_START = 240.0  # seconds for the four servers to answer /ping together (measured: about 25 s on two cores)


@dataclass
class Logged:
    run_id: str
    model_uri: str  # models:/m-...
    image: Path  # one image of the task's own data
    classes: list[str]
    category_ids: list[int]


def _data(task: str, folder: Path, shapes: Path) -> tuple[Path, dict, Path]:
    """The task's data root, its `data` and `model` sections, and one of its images."""
    if task == "classification":
        data = {"image_size": 32, "batch_size": 16, "val_transforms": [{"name": "Resize", "height": 32, "width": 32}]}
        return shapes, {"data": data, "model": {"backbone": RESNET18}}, sorted((shapes / "val").rglob("*.png"))[0]
    if task == "face":
        root = synth_faces.generate(folder / task, image_size=32, train_identities=4, images_per_identity=4,
                                    holdout_identities=4, holdout_images=2, pairs_per_fold=2)
        sections = {"data": {"image_size": 32, "batch_size": 8, "verification": ["holdout"]},
                    "model": {"backbone": RESNET18, "embedding_dim": EMBEDDING_DIM}}
        return root, sections, sorted((root / "train").rglob("*.jpg"))[0]  # a JPEG: the others send PNGs
    size = 64 if task == "detection" else 32
    root = synth_coco.generate(folder / task, image_size=size, train_images=4, val_images=2)
    model = DETECTOR if task == "detection" else {"backbone": RESNET18}
    return root, {"data": {"image_size": size, "batch_size": 2}, "model": model}, root / "images" / "val" / "0000.png"


@pytest.fixture(scope="module")
def store(module_dir: Path, empty_store: Path) -> Path:
    folder = module_dir
    shutil.copy(empty_store, folder / "mlflow.db")
    return folder


@pytest.fixture(scope="module")
def trained(store: Path, shapes: Path):
    """task -> its logged run, trained on first use (the in-process test needs classification only)."""
    uri = f"sqlite:///{store}/mlflow.db"
    done: dict[str, Logged] = {}

    def get(task: str) -> Logged:
        if task in done:
            return done[task]
        root, sections, image = _data(task, store / "data", shapes)
        cfg = {"task": task, "seed": 0, "model": sections["model"],
               "data": {"root": str(root), "num_workers": 0, **sections["data"]},
               "train": {"epochs": 1, "output_dir": str(store / "out" / task)},
               "tracking": {"uri": uri, "experiment": task, "log_model": True, "log_checkpoint": False}}
        path = store / f"{task}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(store)  # artifacts go under ./mlruns
            result = runner.run(path)
        experiment = mlflow.MlflowClient(uri).get_experiment_by_name(task).experiment_id
        with tracking.process_tracking_uri(uri):
            (model,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
        info = checkpoint.load(result.output_dir / checkpoint.BEST)["info"]
        category_ids = (info.get("facts") or {}).get("category_ids", [])
        done[task] = Logged(result.run_id, f"models:/{model.model_id}", image, info["classes"], category_ids)
        return done[task]

    return get


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}


# --- in process ------------------------------------------------------------------------------------------------------


def test_logged_model_predicts_any_image_mode_and_refuses_bad_input_as_400(trained, store: Path):
    logged = trained("classification")
    with tracking.process_tracking_uri(f"sqlite:///{store}/mlflow.db"):
        model = mlflow.pyfunc.load_model(logged.model_uri)
        local = Path(mlflow.artifacts.download_artifacts(logged.model_uri))
    # the logged model is code plus weights: nothing to unpickle, and its example request is one small PNG
    assert not list(local.rglob("*.pkl")) and (local / "served_model.py").is_file()
    assert (local / "serving_input_example.json").stat().st_size < 2_000

    rgb = Image.open(logged.image).convert("RGB")
    modes = [rgb, rgb.convert("L"), rgb.convert("RGBA"), Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)]
    records = model.predict(pd.DataFrame({"image": [b64(png(m)) for m in modes]}), params={"top_k": 2})
    assert len(records) == 4
    for record in records:
        assert record["class"] in logged.classes and 0 <= record["prob"] <= 1
        assert [top["class"] for top in record["top_k"]][0] == record["class"] and len(record["top_k"]) == 2
    # the same pixels in grey, 16-bit grey: the same answer (16-bit scales to 8 bits exactly: x * 257 / 257)
    assert records[1] == records[3]

    not_png = png(rgb)[:-40]  # truncated: the header decodes, the pixels do not
    cases = [
        (pd.DataFrame({"picture": [b64(png(rgb))]}), "missing inputs ['image']"),
        (pd.DataFrame({"image": [5]}), "Incompatible input types for column image"),
        (pd.DataFrame({"image": ["hello!"]}), "image 0 is not base64"),
        (pd.DataFrame({"image": [b64(png(rgb)), b64(b"GIF? no, plain text")]}), "image 1 is not an image file"),
        (pd.DataFrame({"image": [b64(not_png)]}), "image 0 is not an image file, or a corrupt or truncated one"),
    ]
    for frame, message in cases:
        with pytest.raises(MlflowException, match=re.escape(message)) as err:
            model.predict(frame)
        assert err.value.get_http_status_code() == 400, message
    with pytest.raises(MlflowException, match="top_k must be at least 1") as err:
        model.predict(pd.DataFrame({"image": [b64(png(rgb))]}), params={"top_k": 0})
    assert err.value.get_http_status_code() == 400


def test_a_model_logged_before_the_stage_folders_still_serves(trained, store: Path, tmp_path: Path):
    """Models logged by earlier versions carry their code file, which imports `pipeline.serve`, and a checkpoint whose
    info keeps the task's facts at the top level: both still load, and answer as a model logged today."""
    logged = trained("classification")
    with tracking.process_tracking_uri(f"sqlite:///{store}/mlflow.db"):
        today = mlflow.pyfunc.load_model(logged.model_uri)
        old = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "old")))
    (old / "served_model.py").write_text("from mlflow.models import set_model\n\nfrom pipeline.serve import ServedModel\n"
                                         "\nset_model(ServedModel())\n")
    (weights,) = old.rglob("*.pt")
    ckpt = torch.load(weights, weights_only=True)
    ckpt["info"] = {k: v for k, v in ckpt["info"].items() if k != "facts"} | {
        "category_ids": [], "ignore_index": None, "verification": [], "batches_per_epoch": 1}
    torch.save(ckpt, weights)
    frame = pd.DataFrame({"image": [b64(png(Image.open(logged.image).convert("RGB")))]})
    assert mlflow.pyfunc.load_model(str(old)).predict(frame) == today.predict(frame)


# --- over HTTP -------------------------------------------------------------------------------------------------------


def post(port: int, body: dict | str) -> tuple[int, str]:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
            return True
    except OSError:
        return False


@dataclass
class Server:
    port: int
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def servers(trained, store: Path):
    """task -> a running `mlflow models serve` of its logged model; all stopped (and their ports closed) at the end.
    Classification and detection are served as runs:/<run id>/model, the others as models:/m-..."""
    logged = {task: trained(task) for task in TASKS}
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1",
           # the server starts `uvicorn` by name: the one of this environment
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started: dict[str, Server] = {}
    try:
        for task, run in logged.items():
            uri = f"runs:/{run.run_id}/model" if task in ("classification", "detection") else run.model_uri
            port, log = free_port(), store / f"serve-{task}.log"
            with log.open("w") as out:
                # a session of its own: the server's uvicorn child goes down with it (killpg below)
                process = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                     "-h", "127.0.0.1", "-p", str(port)],
                    cwd=store, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            started[task] = Server(port, process, log)
        deadline = time.monotonic() + SERVER_START
        waiting = set(started)
        while waiting and time.monotonic() < deadline:
            for task in list(waiting):
                server = started[task]
                if server.process.poll() is not None:
                    tail = server.log.read_text()[-3000:]
                    pytest.fail(f"{task} server exited ({server.process.returncode}):\n{tail}")
                if _ping(server.port):
                    waiting.discard(task)
            time.sleep(0.5)
        assert not waiting, f"no /ping answer within {SERVER_START:.0f}s from: {', '.join(sorted(waiting))}"
        yield started
    finally:
        _stop([server.process for server in started.values()])
    assert not [task for task, server in started.items() if port_open(server.port)], "a server port is still open"


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each server's process group (the CLI and its uvicorn child); SIGKILL to what is left after 20 s."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(_group_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the CLI once it exits: a zombie still counts as a member of its group
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _check_records(task: str, records: list[dict], logged: Logged, sizes: list[tuple[int, int]]) -> None:
    """The task's record shape (pipeline/tasks/base.py), per image; `sizes` are the images' (width, height)."""
    assert len(records) == len(sizes)
    for record, (width, height) in zip(records, sizes):
        if task == "classification":
            assert record["class"] in logged.classes and 0 <= record["prob"] <= 1
            assert [top["class"] for top in record["top_k"]][0] == record["class"]
        elif task == "detection":
            assert isinstance(record["detections"], list)
            for d in record["detections"]:
                x1, y1, x2, y2 = d["bbox"]
                assert 0 <= x1 <= x2 <= width + 0.01 and 0 <= y1 <= y2 <= height + 0.01
                assert d["category_id"] in logged.category_ids and d["score"] >= 0.0
                assert d["category"] == logged.classes[logged.category_ids.index(d["category_id"])]
        elif task == "segmentation":
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["mask_png"]))))
            assert mask.shape == (height, width) == (record["height"], record["width"])
            assert set(np.unique(mask).tolist()) <= set(range(len(logged.classes)))
            assert record["classes"] == [logged.classes[i] for i in np.unique(mask).tolist()]
        else:
            embedding = np.asarray(record["embedding"])
            assert embedding.shape == (EMBEDDING_DIM,)
            assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_served_model_answers_a_posted_image_and_refuses_bad_input(task, servers, trained):
    logged, port = trained(task), servers[task].port
    image = Image.open(logged.image)
    # the task's own image file as it is, and the same image at another size and aspect ratio as a PNG
    other = image.convert("RGB").resize((image.width * 3 // 2, image.height // 2 + 8))
    status, body = post(port, request(b64(logged.image.read_bytes()), b64(png(other))))
    assert status == 200, body
    _check_records(task, json.loads(body)["predictions"], logged, [image.size, other.size])
    if task == "detection":  # the score threshold is a request parameter: 0 keeps every detection
        status, body = post(port, {**request(b64(logged.image.read_bytes())), "params": {"score": 0.0}})
        assert status == 200 and json.loads(body)["predictions"][0]["detections"], body

    bad = [({"dataframe_split": {"columns": ["picture"], "data": [[b64(png(other))]]}}, "missing inputs ['image']"),
           (request(b64(b"plain text, not an image")), "image 0 is not an image file"),
           (request("%%% not base64 %%%"), "image 0 is not base64"),
           ("{not json", "valid JSON")]
    for payload, message in bad:
        status, body = post(port, payload)
        assert status == 400, (payload, status, body)
        answer = json.loads(body)
        assert message in answer["message"], answer
        assert "stack_trace" not in answer and "Traceback" not in body, answer
