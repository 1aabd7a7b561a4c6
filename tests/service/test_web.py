"""The web page of `maisi serve` on 127.0.0.1: the page and its vendored NiiVue are served, the files route answers
readable volumes behind the token and refuses paths outside the job, and (slow) headless Chromium drives the page
from a submitted job to the viewer."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from maisi.data.preview import label_colours
from maisi.labels import label_id
from pipeline_support import save_tiny_model
from service_support import SMALL, ThreadServer, options

TOKEN = "web-token"
VENDOR = Path(__file__).resolve().parents[2] / "src" / "maisi" / "service" / "web" / "vendor"
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "serve_viewer.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    model = save_tiny_model(tmp_path_factory.mktemp("model"))[0]
    with ThreadServer(options(model, tmp_path_factory.mktemp("work"), token=TOKEN)) as client:
        yield client


@pytest.fixture(scope="module")
def job(server) -> str:
    """A finished job with a NIfTI image and an NRRD label."""
    reply = server.post("/v1/jobs", {**SMALL, "seed": 5, "label_output_ext": ".nrrd"})
    assert reply.status == 202, reply.body
    done = server.wait_job(reply.json()["id"])
    assert done["state"] == "done", done
    return done["id"]


# ---- the page and its assets --------------------------------------------------------------------------

@pytest.mark.parametrize("path, kind, holds", [
    ("/", "text/html", b'src="/web/vendor/niivue.umd.js"'),
    ("/web/app.js", "javascript", b"new niivue.Niivue("),
    ("/web/style.css", "text/css", b"#canvas-box"),
])
def test_page_is_served_without_the_token(server, path, kind, holds):
    reply = server.get(path, token="")  # the page asks for the token itself
    assert reply.status == 200 and kind in reply.headers["content-type"] and holds in reply.body


def test_vendored_niivue_is_served_as_pinned(server):
    record = json.loads((VENDOR / "VENDOR.json").read_text())
    reply = server.get(f"/web/vendor/{record['file']}", token="")
    assert reply.status == 200 and "javascript" in reply.headers["content-type"]
    assert hashlib.sha256(reply.body).hexdigest() == record["sha256"] and record["version"] == "0.69.0"
    assert reply.body.startswith(b"(function(") and b"sA.niivue={}" in reply.body[:400]  # the UMD global


def test_legend_names_and_colours_every_label(server):
    legend = {entry["id"]: entry for entry in server.get("/v1/maisi/legend").json()["labels"]}
    liver = legend[label_id("liver")]
    assert liver["name"] == "liver" and liver["rgb"] == label_colours()[liver["id"]].tolist()
    assert legend[200]["rgb"] == [0, 0, 0]  # the body: transparent in the overlay


# ---- the files route ----------------------------------------------------------------------------------

def test_files_route_answers_readable_volumes(server, job, tmp_path):
    names = {f["name"] for f in server.get(f"/v1/jobs/{job}/files").json()["files"]}
    image, label, record = (next(n for n in names if n.endswith(end)) for end in
                            ("_image.nii.gz", "_label.nrrd", "_record.json"))
    reply = server.get(f"/v1/jobs/{job}/files/{image}")
    assert reply.status == 200 and reply.headers["content-type"] == "application/gzip"
    assert "content-encoding" not in {k.lower() for k in reply.headers}  # NiiVue unzips it, not the browser
    (tmp_path / image).write_bytes(reply.body)
    vol = nib.load(tmp_path / image)
    assert vol.shape == (32, 32, 32) and np.allclose(vol.header.get_zooms(), 8.0)
    hu = np.asarray(vol.dataobj)
    assert hu.min() >= -1000 and hu.max() <= 1000 and hu.std() > 0
    (tmp_path / label).write_bytes(server.get(f"/v1/jobs/{job}/files/{label}").body)
    ids, header = nrrd.read(str(tmp_path / label))
    assert ids.shape == (32, 32, 32) and header["type"].startswith("u") and ids.max() > 0
    rec = server.get(f"/v1/jobs/{job}/files/{record}").json()
    assert rec["seed"] == 5 and rec["files"]["image"] == image


def test_files_route_needs_the_token(server, job):
    name = server.get(f"/v1/jobs/{job}/files").json()["files"][0]["name"]
    for path in (f"/v1/jobs/{job}/files", f"/v1/jobs/{job}/files/{name}", "/v1/maisi/legend"):
        assert server.get(path, token="").status == 401
        assert server.get(path, token="wrong").status == 401
    assert server.get(f"/v1/jobs/{job}/files/{name}").status == 200


@pytest.mark.parametrize("path", [
    "/v1/jobs/{job}/files/..", "/v1/jobs/{job}/files/..%2F..%2Fjobs.sqlite", "/v1/jobs/{job}/files/%2e%2e%2fserver.lock",
    "/v1/jobs/{job}/files/..%2Fresult.zip", "/v1/jobs/{job}/files/%2Fetc%2Fpasswd", "/v1/jobs/..%2F..%2F/files/jobs.sqlite",
    "/v1/jobs/{job}/files/.hidden.json", "/web/..%2F..%2Fapp.py", "/web/../app.py", "/web/vendor/..%2F..%2Fconfig.py",
])
def test_paths_outside_the_job_are_refused(server, job, path):
    reply = server.get(path.format(job=job))
    assert reply.status == 404, (path, reply.status, reply.body[:200])
    assert b"SQLite" not in reply.body and b"import" not in reply.body


def test_hidden_files_and_links_out_of_the_job_are_refused(server, job, tmp_path):
    """Names the router lets through: a hidden file, and a link in the output folder to a file outside it."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    out = server.work_dir / "jobs" / job / "out"
    (out / ".notes.json").write_text('{"secret": 2}')
    (out / "escape.json").symlink_to(secret)
    try:
        for name in (".notes.json", "escape.json"):
            reply = server.get(f"/v1/jobs/{job}/files/{name}")
            assert reply.status == 404 and b"secret" not in reply.body, (name, reply.body)
    finally:
        (out / ".notes.json").unlink()
        (out / "escape.json").unlink()


def test_unknown_job_and_missing_file_are_404_with_a_reason(server, job):
    assert "no job" in server.get("/v1/jobs/nope/files").detail
    assert "has no file" in server.get(f"/v1/jobs/{job}/files/sample_seed99_image.nii.gz").detail


# ---- the browser test -----------------------------------------------------------------------------------

def browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromium-driver (apt-get install chromium chromium-driver); skips without them."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    chromium = os.environ.get("MAISI_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("MAISI_CHROMEDRIVER") or shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no Chromium and chromedriver found: apt-get install chromium chromium-driver "
                    "(or set MAISI_CHROMIUM and MAISI_CHROMEDRIVER)")
    return chromium, driver


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"):
        opts.add_argument(arg)  # WebGL2 on the CPU (SwiftShader): no GPU on a test machine
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    yield driver
    driver.quit()


def canvas_pixels(driver) -> np.ndarray:
    from PIL import Image
    from selenium.webdriver.common.by import By

    time.sleep(0.3)  # the next animation frame
    png = driver.find_element(By.ID, "gl").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


@pytest.mark.slow
def test_browser_submits_a_job_and_views_it(server, browser, tmp_path):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.action_chains import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d, wait = browser, WebDriverWait(browser, 120)
    d.get(server.base + "/")
    # the server has a token: the page asks for it
    wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(TOKEN)
    d.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input[name=body_region][value=chest]"))).click()
    form = {"size_x": 32, "size_y": 32, "size_z": 32, "spacing_x": 8, "spacing_y": 8, "spacing_z": 8, "steps": 1,
            "seed": 11}
    for name, value in form.items():
        field = d.find_element(By.NAME, name)
        field.clear()
        field.send_keys(str(value))
    d.find_element(By.NAME, "quality_check").click()
    d.find_element(By.ID, "submit-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "form-message"), "queued"))

    # the job list follows it to done; the viewer opens it
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "tr[data-state=done] button.view"))).click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-viewer") == "ready")
    assert json.loads(d.find_element(By.ID, "record").text)["seed"] == 11
    legend = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#legend-list li")]
    assert legend and all(li.split(" ", 1)[1] for li in legend), legend  # id and MAISI name

    # scrolling: the axial slider moves the crosshair by voxels; the mouse wheel over the canvas moves it too
    pos = "return maisiViewer.nv.scene.crosshairPos.map(Number)"
    before = d.execute_script(pos)
    d.execute_script("const s = document.getElementById('slice-axial'); s.value = 5;"
                     "s.dispatchEvent(new Event('input'));")
    after = d.execute_script(pos)
    assert after[2] == pytest.approx(5.5 / 32, abs=1e-3) and after[:2] == pytest.approx(before[:2], abs=1 / 32), (before, after)  # snapped to voxel centres
    canvas = d.find_element(By.ID, "gl")
    ActionChains(d).scroll_from_origin(ScrollOrigin.from_element(canvas, -200, -100), 0, 300).perform()
    time.sleep(0.3)
    assert d.execute_script(pos) != after

    # window presets: the volume's display range changes, and so do the pixels
    d.find_element(By.CSS_SELECTOR, ".preset[data-preset=lung]").click()
    assert d.execute_script("const v = maisiViewer.nv.volumes[0]; return [v.cal_min, v.cal_max]") == [-1350, 150]
    lung = canvas_pixels(d)
    d.find_element(By.CSS_SELECTOR, ".preset[data-preset=bone]").click()
    bone = canvas_pixels(d)
    assert lung.std() > 10, "the canvas is uniform: nothing was drawn"
    assert np.abs(lung - bone).mean() > 2, "the lung and bone windows draw the same pixels"

    d.find_element(By.CSS_SELECTOR, ".preset[data-preset=soft]").click()
    d.set_window_size(1400, 1500)  # the whole page: form, job list and viewer
    d.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    for target in (tmp_path / "serve_viewer.png", DOCS_SHOT):
        assert d.save_screenshot(str(target))
    assert (tmp_path / "serve_viewer.png").stat().st_size > 20_000
