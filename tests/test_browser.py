"""A real browser: notebook 02's token inspector in JupyterLab, driven through its slider.

Starts JupyterLab headless on 127.0.0.1 (serving a temporary copy of notebook 02), opens it in
headless Chromium via selenium, runs it with the menu's Run > Run All Cells, then moves the
inspector's "example" slider with the keyboard and with its editable readout, and checks each
time that the rendered table is exactly what `helpers.widgets.inspector.token_rows` gives for that
example. Screenshots go to $BROWSER_ARTIFACTS (default: a temp folder, printed).

Needs /usr/bin/chromium, /usr/bin/chromedriver and selenium (`.ci/browser-deps.sh`); skipped
without them, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from helpers.data import load_instruction_data, split_data
from helpers.widgets.inspector import token_rows
from tests.browser_support import chromium, jupyterlab, missing_browser, wait_for

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_batching_and_masking.ipynb"
# The inspector cell's arguments (notebook 02, section 5).
INSPECTOR_OPTIONS = {"style": "alpaca", "mask_prompt": True, "extra_padding": 2}

# The output area of the inspector cell (the code cell that builds the TokenInspector).
FIND_INSPECTOR_OUTPUT_JS = """
for (const cell of document.querySelectorAll('.jp-CodeCell')) {
  const source = cell.querySelector('.jp-InputArea-editor');
  if (source && source.textContent.includes('inspector = TokenInspector(')) {
    return cell.querySelector('.jp-OutputArea');
  }
}
return null;
"""
# Its table as text: [summary line, [[cell text, ...] per row]]; exact textContent, no reflow.
READ_TABLE_JS = """
const out = arguments[0];
const html = out.querySelector('.widget-html-content');
if (!html || !html.querySelector('table')) return null;
const summary = html.querySelectorAll('p')[1];
const rows = [...html.querySelectorAll('table tr')].slice(1).map(
  tr => [...tr.querySelectorAll('td')].map(td => td.textContent));
return [summary ? summary.textContent : null, rows];
"""


def _expected(entry: dict) -> tuple[str, list[list[str]]]:
    rows = token_rows(entry, **INSPECTOR_OPTIONS)
    counted = sum(r.counted for r in rows)
    summary = (
        f"{len(rows)} positions: {counted} count in the loss, {len(rows) - counted} ignored (-100)"
    )
    cells = [
        [
            str(r.position),
            r.input_text,
            str(r.input_id),
            r.target_text,
            str(r.target_id),
            r.role,
            "✓" if r.counted else "-100",
        ]
        for r in rows
    ]
    return summary, cells


def _artifacts() -> Path:
    folder = Path(
        os.environ.get("BROWSER_ARTIFACTS")
        or Path(tempfile.gettempdir()) / "course-browser-artifacts"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _require_browser() -> None:
    """Skip without a browser, except under CI=true: CI installs one, so missing is a failure."""
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but the browser test cannot run: {reason}")
    pytest.skip(reason)


def _click_menu(driver, menu: str, entry: str) -> None:
    """Click `menu` in JupyterLab's menu bar, then its (enabled) entry labelled `entry`."""
    from selenium.webdriver.common.by import By

    def find(selector: str, label: str, within=driver):
        for el in within.find_elements(By.CSS_SELECTOR, selector):
            if el.text.strip() == label:
                return el
        return None

    wait_for(f"the {menu!r} menu", lambda: find("#jp-MainMenu .lm-MenuBar-item", menu), 20).click()

    def enabled_entry():
        for item in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu .lm-Menu-item"):
            if "lm-mod-disabled" in (item.get_attribute("class") or ""):
                continue
            if find(".lm-Menu-itemLabel", entry, within=item):
                return item
        return None

    wait_for(f"the menu entry {menu} > {entry}", enabled_entry, 20).click()


def _with_slider(output):
    """`output` if it holds the rendered inspector (its slider labelled "example")."""
    from selenium.webdriver.common.by import By

    if output is None:
        return None
    labels = output.find_elements(By.CSS_SELECTOR, ".widget-slider .widget-label")
    return output if any(label.text.strip() == "example" for label in labels) else None


def _kernel_idle(driver) -> bool:
    from selenium.webdriver.common.by import By

    status = driver.find_element(By.ID, "jp-main-statusbar").text
    return "Python 3 | Idle" in status


def _code_prompts(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
        ".map(p => p.textContent.trim());"
    )


def test_inspector_follows_its_slider_in_jupyterlab(chapter_data_path, tmp_path, record_property):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _require_browser()
    started = time.monotonic()
    validation = split_data(load_instruction_data(chapter_data_path)).validation
    artifacts = _artifacts()
    print(f"browser test artefacts (screenshots): {artifacts}")
    record_property("artifacts", str(artifacts))
    (artifacts / "02_inspector_failure.png").unlink(missing_ok=True)  # from an earlier run
    env = {
        "COURSE_MODEL": "tiny",
        "COURSE_DATASET": str(chapter_data_path),
        "MPLBACKEND": "Agg",
        "PYTHONHASHSEED": "0",
    }
    for name in ("TIKTOKEN_CACHE_DIR", "HF_HUB_OFFLINE"):
        if os.environ.get(name):
            env[name] = os.environ[name]

    with jupyterlab([NOTEBOOK], tmp_path, env) as lab, chromium(tmp_path) as driver:
        try:
            driver.get(lab.open_url(NOTEBOOK.name))
            n_code = sum(
                c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"]
            )
            wait_for(
                f"the notebook's {n_code} code cells",
                lambda: len(_code_prompts(driver)) == n_code,
                60,
            )
            wait_for("the Python 3 kernel to be idle", lambda: _kernel_idle(driver), 60)
            # As committed (outputs without widget state), before anything ran.
            before = driver.execute_script(FIND_INSPECTOR_OUTPUT_JS)
            if before is not None:
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", before)
                print(f"inspector output before running: {before.text[:200]!r}")
            driver.save_screenshot(str(artifacts / "02_inspector_before_run.png"))

            # Clear the committed outputs (and execution counts), then run everything.
            _click_menu(driver, "Edit", "Clear Outputs of All Cells")
            wait_for(
                "cleared execution counts",
                lambda: not any(p.strip("[]: ") for p in _code_prompts(driver)),
                20,
            )
            _click_menu(driver, "Run", "Run All Cells")

            def all_ran() -> bool:
                prompts = _code_prompts(driver)
                done = len(prompts) == n_code and all(p.strip("[]:").isdigit() for p in prompts)
                return done and _kernel_idle(driver)

            wait_for("Run All Cells to finish", all_ran, 150, interval=1)
            errors = driver.find_elements(
                By.CSS_SELECTOR,
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']",
            )
            assert not errors, f"a cell raised: {errors[0].text[:2000]}"

            inspector = wait_for(
                "the inspector widget with its 'example' slider",
                lambda: _with_slider(driver.execute_script(FIND_INSPECTOR_OUTPUT_JS)),
                30,
            )
            assert "Error displaying widget" not in inspector.text

            def table_is(index: int):
                expected = _expected(validation[index])

                def probe() -> bool:
                    return driver.execute_script(READ_TABLE_JS, inspector) == list(expected)

                wait_for(f"the table of validation example {index}", probe, 20)

            def readout() -> str:
                return inspector.find_element(
                    By.CSS_SELECTOR, ".widget-slider .widget-readout"
                ).text.strip()

            table_is(0)
            assert readout() == "0"
            assert _expected(validation[0]) != _expected(validation[1])

            # The keyboard: focus the "example" slider's handle, one step right.
            handle = inspector.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
            handle.click()
            handle.send_keys(Keys.ARROW_RIGHT)
            wait_for("the readout to show 1", lambda: readout() == "1", 20)
            table_is(1)

            # The editable readout: type an example number.
            box = inspector.find_element(By.CSS_SELECTOR, ".widget-slider .widget-readout")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys("7", Keys.ENTER)
            wait_for("the readout to show 7", lambda: readout() == "7", 20)
            table_is(7)

            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", inspector)
            inspector.screenshot(str(artifacts / "02_inspector_widget.png"))
            driver.save_screenshot(str(artifacts / "02_inspector.png"))
        except BaseException:
            driver.save_screenshot(str(artifacts / "02_inspector_failure.png"))
            print(f"JupyterLab log:\n{lab.log.read_text(errors='replace')[-5000:]}")
            raise
    print(f"browser test took {time.monotonic() - started:.0f}s")
