"""Shared test fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast instead of hanging

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def no_distributed_leftovers():
    """An in-process fit under a distributed strategy leaves its process group (and the TCP store listening
    on MASTER_PORT) and its MASTER_PORT/RANK variables behind; a later test's subprocesses would inherit
    the port and fail with EADDRINUSE. Tear both down after every test module (after its own module-scoped fixtures)."""
    environ = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory: pytest.TempPathFactory):
    """easy-VQA prepared once per session (images, LLaVA JSON files, trained tokenizer)."""
    from stgc.easy_vqa.prepare import prepare

    return prepare(tmp_path_factory.mktemp("easy_vqa"))


@pytest.fixture(scope="session")
def easy_vqa_tokenizer(easy_vqa_dir):
    """The byte-level BPE tokenizer that prepare() trained."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(easy_vqa_dir / "tokenizer")


@pytest.fixture(scope="session")
def console_runs(easy_vqa_dir, tmp_path_factory) -> dict:
    """One `stgc fit` of stage III with STGC and its validate, test and predict, through the installed
    console script (support.console.fit_and_evaluate): test_console checks the runs, test_board the events."""
    from support.console import fit_and_evaluate

    return fit_and_evaluate(easy_vqa_dir, tmp_path_factory.mktemp("console"))


@pytest.fixture
def write_llava(tmp_path):
    """Function writing records to tmp_path/data.json and 8x8 PNGs for their images under tmp_path/images;
    `broken_images` are PNGs cut short: their header reads, their pixels do not."""
    import io
    import json

    from PIL import Image

    def write(records: list, broken_images: tuple[str, ...] = ()):
        images = tmp_path / "images"
        images.mkdir(exist_ok=True)
        for record in records:
            if isinstance(record, dict) and record.get("image"):
                path = images / record["image"]
                if record["image"] in broken_images:
                    png = io.BytesIO()
                    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, "PNG")
                    path.write_bytes(png.getvalue()[:50])  # past the IHDR header, inside the pixel data
                else:
                    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
        return path, images

    return write
