"""Remake README's images from a real sweep on real MNIST: `make readme-images`.

    python docs/readme_images.py --data ../shared/data/mnist [--workdir DIR] [--reuse]

1. Runs the default sweep (momentum_decay, as `make sweep` does) in a work folder with its own
   stores (--reuse: keep a finished one there).
2. Takes two of the parent run's plots (the momentum-vs-decay contour, the top trials' curves).
3. Opens `mlflow ui` over that store in headless Chromium (Debian's chromium and chromium-driver,
   selenium from PyPI) at the deep link the sweep prints, and at the parent run's page.
4. Writes docs/images/*.png, each under 200 KB (scaled, 256 colours).

The browser helpers here serve the browser test too (tests/test_browser.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from mnist_sweep.servers.local import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
MAX_BYTES = 200_000


# ----------------------------------------------------------------------------- browser helpers


@contextlib.contextmanager
def mlflow_ui(store_uri: str, cwd: Path) -> Iterator[str]:
    """`mlflow ui` over a store on a free port (its log: cwd/mlflow-ui.log); its base URL while
    the block runs."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    with open(cwd / "mlflow-ui.log", "ab") as log:  # a file, not a pipe nobody reads: never full
        server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", store_uri, "--host",
                                   "127.0.0.1", "--port", str(port)], cwd=cwd,
                                  start_new_session=True, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, what="mlflow ui")
        yield base
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@contextlib.contextmanager
def chromium(width: int = 1500, height: int = 900):
    """Headless Chromium driven by Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, text: str, timeout: float = 90) -> None:
    """Until `text` shows on the page (the UI renders a while after the page loads)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: text in d.find_element("tag name", "body").text)


def table_run_names(driver) -> list[str]:
    """The runs table's run names, top to bottom (ag-grid orders rows by row-index, not DOM)."""
    rows = driver.find_elements("css selector", "[role='row'][row-index]")
    by_index: dict[int, str] = {}
    for row in rows:
        index = int(row.get_attribute("row-index"))
        names = [line for line in row.text.splitlines() if line[:1] == "t" and line[1:4].isdigit()]
        if names:
            by_index.setdefault(index, names[0])
    return [by_index[i] for i in sorted(by_index)]


def wait_for_rows(driver, count: int, timeout: float = 90) -> list[str]:
    """The runs table's run names once at least `count` rows show: the "N matching runs" line
    comes before the rows, which render after a spinner."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(
            lambda d: (names := table_run_names(d)) and len(names) >= count and names)
    except TimeoutException:
        raise AssertionError(f"fewer than {count} rows in the runs table after {timeout:.0f} s: "
                             f"{table_run_names(driver)}") from None


def close_assistant(driver) -> None:
    """MLflow 3.17 opens its Assistant panel beside the runs; close it for a wider table."""
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            button.click()


# ----------------------------------------------------------------------------- the images


def run_default_sweep(data: Path, workdir: Path, reuse: bool) -> None:
    if reuse and (workdir / "mlflow.db").exists():
        return
    for name in ("mlflow.db", "optuna.db", "mlruns"):
        path = workdir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum_decay",
                    f"data.root={data}", "data.download=false", "sweep.final_report=wait"],
                   cwd=workdir, check=True)


def small_png(source: Path, target: Path, width: int) -> None:
    """Scaled to `width`, 256 colours: a README image under 200 KB."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    if target.stat().st_size > MAX_BYTES:
        raise RuntimeError(f"{target} is {target.stat().st_size} bytes, over {MAX_BYTES}")


def make_images(data: Path, workdir: Path, reuse: bool) -> list[Path]:
    from mlflow.tracking import MlflowClient

    from mnist_sweep.tracking.review import run_view, trials_view

    workdir.mkdir(parents=True, exist_ok=True)
    run_default_sweep(data, workdir, reuse)
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(store)
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.sweep_role = 'parent' and tags.study_name = 'momentum_decay'")[0]
    plots = Path(client.download_artifacts(parent.info.run_id, "plots", str(workdir)))
    IMAGES.mkdir(parents=True, exist_ok=True)
    made = []
    contour = next(plots.glob("contour_*.png"))
    for source, name in ((contour, "contour.png"), (plots / "top_trials_curves.png", "top_trials_curves.png")):
        small_png(source, IMAGES / name, 900)
        made.append(IMAGES / name)
    experiment = parent.info.experiment_id
    with mlflow_ui(store, workdir) as base, chromium() as driver:
        shots = workdir / "screenshots"
        shots.mkdir(exist_ok=True)
        driver.get(f"{base}/{trials_view(experiment, 'momentum_decay', 'val_acc', True)}")
        wait_for_rows(driver, 1)
        close_assistant(driver)
        time.sleep(2)
        driver.save_screenshot(str(shots / "trials.png"))
        driver.get(f"{base}/{run_view(experiment, parent.info.run_id)}")
        wait_for_text(driver, "Best: trial")
        close_assistant(driver)
        heading = driver.find_element("xpath", "//*[starts-with(normalize-space(text()), 'Optuna study')]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
        time.sleep(2)
        driver.save_screenshot(str(shots / "parent.png"))
    for name in ("trials.png", "parent.png"):
        small_png(shots / name, IMAGES / f"mlflow_{name}", 1100)
        made.append(IMAGES / f"mlflow_{name}")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the sweep's stores go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="keep a finished sweep in --workdir")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="readme-images-"))
    for path in make_images(args.data.resolve(), workdir.resolve(), args.reuse):
        print(f"{path.relative_to(REPO)}: {path.stat().st_size // 1000} KB")


if __name__ == "__main__":
    main()
