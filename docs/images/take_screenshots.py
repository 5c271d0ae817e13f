"""The two MLflow screenshots in docs/architecture.md: a sweep's runs view (the parent expanded, the score and cost
columns shown) and its parent run, taken with headless Chromium through Playwright (neither is a dependency of
apt_ray: `pip install playwright` and a system Chromium).

    mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5056 &
    python docs/images/take_screenshots.py http://127.0.0.1:5056 <experiment id> <parent run id> docs/images

The clicks follow MLflow 3.17's UI: the model-training view, the assistant panel closed, the columns picked, the
parent row expanded.
"""
import os
import sys
from playwright.sync_api import sync_playwright

base, exp, parent, out = sys.argv[1:5]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1500, "height": 640})
    page.goto(f"{base}/#/experiments/{exp}/runs")
    page.wait_for_timeout(6000)
    page.get_by_text("Model training", exact=True).first.click(timeout=3000)
    page.wait_for_timeout(3000)
    page.mouse.click(1463, 35)  # close the assistant panel
    page.wait_for_timeout(1500)
    page.get_by_text("Columns", exact=True).first.click()
    page.wait_for_timeout(1000)
    for name in ("Source", "Models", "Dataset", "val_score", "additional_gmacs", "additional_pct_of_base"):
        page.get_by_placeholder("Search columns").fill(name)
        page.wait_for_timeout(700)
        page.get_by_text(name, exact=True).last.click()
        page.wait_for_timeout(700)
    page.keyboard.press("Escape")
    page.wait_for_timeout(800)
    page.mouse.click(1000, 600)
    page.wait_for_timeout(800)
    page.mouse.click(318, 264)  # expand the parent row
    page.wait_for_timeout(2000)
    page.screenshot(path=f"{out}/mlflow_runs.png")
    page.set_viewport_size({"width": 1500, "height": 900})
    page.goto(f"{base}/#/experiments/{exp}/runs/{parent}")
    page.wait_for_timeout(5000)
    page.get_by_text("Show more", exact=True).first.click(timeout=3000)
    page.wait_for_timeout(1000)
    page.screenshot(path=f"{out}/mlflow_parent.png", full_page=True)
    browser.close()
