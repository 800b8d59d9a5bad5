"""The logged MLflow model serves: `mlflow models serve` on 127.0.0.1 answers a POSTed image with the task's records,
and a bad request (wrong schema, undecodable image) gets HTTP 400 with a message and no traceback.

The served models are the session's trained runs (tests/shared_runs.py). Each reply is compared, value by value, with
`pipeline predict` of the same checkpoint on the same image, at another size than the model's input: the server must
answer what the checkpoint answers. The four servers start together: starting one (imports, model load) is most of
this file's time.
"""
import base64
import contextlib
import csv
import io
import json
import os
import re
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
from click.testing import CliRunner
from loopback import free_port, port_open
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import tracking
from pipeline.cli import main
from pipeline.tasks.base import PredictOptions

# the first test also trains the four shared runs and starts four servers
pytestmark = pytest.mark.timeout(900)

TASKS = ("classification", "detection", "segmentation", "face")
TOP_K = 3  # classes per image asked of the server and of predict
SERVER_START = 240.0  # seconds for the four servers to answer /ping together (measured: about 25 s on two cores)


@dataclass
class Logged:
    run_id: str
    model_uri: str  # models:/m-...
    image: Path  # one image of the task's own data
    classes: list[str]
    category_ids: list[int]
    checkpoint: Path  # the run's best.pt, which the logged model holds
    embedding_dim: int  # face


@pytest.fixture(scope="module")
def store(trained_runs) -> Path:
    """The folder of the session's store of trained runs (tests/shared_runs.py): the servers' working directory."""
    return trained_runs.folder


@pytest.fixture(scope="module")
def trained(trained_runs):
    """task -> the session's trained run of it, model logged (trained on first use)."""

    def get(task: str) -> Logged:
        run = trained_runs(task)
        params = mlflow.MlflowClient(run.uri).get_run(run.run_id).data.params
        return Logged(run.run_id, run.model_uri, run.images[0], run.classes, run.category_ids, run.checkpoint,
                      int(params.get("model.embedding_dim", 0)))

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


@pytest.mark.parametrize("task", TASKS)
def test_the_logged_model_in_process_answers_what_the_checkpoint_answers(task, trained, store: Path, tmp_path: Path):
    """The served model's own code without the server: MLflow's pyfunc of the logged model, loaded here, answers an
    image of another size than the model's input as `pipeline predict` of the checkpoint does (the HTTP test below
    adds the server), at the default score and at score=0."""
    logged = trained(task)
    image = _other_size(logged.image, tmp_path / f"{task}.png")
    with tracking.process_tracking_uri(f"sqlite:///{store}/mlflow.db"):
        model = mlflow.pyfunc.load_model(logged.model_uri)
    for score in (None, 0.0):
        cut = PredictOptions().score if score is None else score
        with _one_thread():  # as the servers run, and `_local` below
            (served,) = model.predict(pd.DataFrame({"image": [b64(image.read_bytes())]}),
                                      params={"top_k": TOP_K, **({} if score is None else {"score": score})})
        _local(logged.checkpoint, image, tmp_path / f"local-{cut}", cut)
        _assert_same_answer(task, served, tmp_path / f"local-{cut}", image, cut)


def test_a_model_logged_before_the_stage_folders_still_serves(trained, store: Path, tmp_path: Path):
    """Models logged by earlier versions carry their code file, which imports `pipeline.serve`, and a checkpoint whose
    info keeps the task's facts at the top level: both still load, and answer as a model logged today."""
    logged = trained("classification")
    with tracking.process_tracking_uri(f"sqlite:///{store}/mlflow.db"):
        today = mlflow.pyfunc.load_model(logged.model_uri)
        old = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "old")))
    (old / "served_model.py").write_text("from mlflow.models import set_model\n\nfrom pipeline.serve import "
                                         "ServedModel\n"
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
            assert embedding.shape == (logged.embedding_dim,)
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


# --- the server answers what the checkpoint answers ------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _other_size(source: Path, out: Path) -> Path:
    """The image at another size and aspect ratio than its own and the model's input, as a PNG."""
    with Image.open(source) as image:
        image.convert("RGB").resize((image.width * 3 // 2, image.height // 2 + 8)).save(out)
    return out


def _local(checkpoint: Path, image: Path, out: Path, score: float) -> None:
    """`pipeline predict` of the checkpoint on the image, in this process, on one thread as the servers run."""
    with _one_thread():
        result = CliRunner().invoke(main, ["predict", str(checkpoint), str(image), "--out", str(out), "--score",
                                           str(score), "--top-k", str(TOP_K)])
    assert result.exit_code == 0, result.output


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else float(a == b)


def _assert_same_answer(task: str, served: dict, out: Path, image: Path, score: float) -> None:
    """The served record of one image against the files `pipeline predict` wrote for it."""
    if task == "classification":
        with (out / "predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [r["class"] for r in rows] == [top["class"] for top in served["top_k"]] and len(rows) == TOP_K
        np.testing.assert_allclose([top["prob"] for top in served["top_k"]], [float(r["prob"]) for r in rows],
                                   rtol=0, atol=2e-6)  # the CSV keeps 6 decimals
    elif task == "detection":
        # predictions.json keeps every detection the model returns; the reply those scoring at least `score`
        local = [{"bbox": [x, y, x + w, y + h], "category_id": r["category_id"], "score": r["score"]}
                 for r in json.loads((out / "predictions.json").read_text()) for x, y, w, h in [r["bbox"]]
                 if r["score"] >= score]
        remote = served["detections"]
        assert len(remote) == len(local), (remote, local)
        unmatched = list(local)
        for d in remote:
            match = next((m for m in unmatched if m["category_id"] == d["category_id"]
                          and _iou(m["bbox"], d["bbox"]) >= 0.99), None)
            assert match is not None, f"served {d} has no box of its category at IoU >= 0.99 in {local}"
            assert match["score"] == pytest.approx(d["score"], abs=1e-4)
            unmatched.remove(match)
    elif task == "segmentation":
        with Image.open(out / "masks" / image.name) as mask:
            local = np.asarray(mask)
        remote = np.asarray(Image.open(io.BytesIO(base64.b64decode(served["mask_png"]))))
        assert remote.shape == local.shape and np.array_equal(remote, local)
    else:
        local = np.load(out / "embeddings.npy")[0]
        remote = np.asarray(served["embedding"], dtype=np.float64)
        assert float(local @ remote / (np.linalg.norm(local) * np.linalg.norm(remote))) >= 0.9999


@pytest.mark.parametrize("task", TASKS)
def test_served_answers_equal_the_checkpoints_own_on_an_image_of_another_size(task, servers, trained, tmp_path):
    """One image at a size and aspect ratio the model was not fed: the HTTP reply (at the default score and at
    score=0) and `pipeline predict` of the run's best checkpoint on that file agree: classes and probabilities,
    boxes (IoU >= 0.99, same category), masks pixel for pixel, embeddings (cosine >= 0.9999)."""
    logged, port = trained(task), servers[task].port
    image = _other_size(logged.image, tmp_path / f"{task}.png")
    for score in (None, 0.0):
        params = {"top_k": TOP_K, **({} if score is None else {"score": score})}
        status, body = post(port, {**request(b64(image.read_bytes())), "params": params})
        assert status == 200, body
        (served,) = json.loads(body)["predictions"]
        cut = PredictOptions().score if score is None else score
        out = tmp_path / f"local-{cut}"
        _local(logged.checkpoint, image, out, cut)
        _assert_same_answer(task, served, out, image, cut)
        if task == "detection" and score == 0.0:
            assert served["detections"], "nothing to compare: the detector returned no box at all"
