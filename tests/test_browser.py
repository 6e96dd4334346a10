"""A real browser: notebook 02's token inspector in JupyterLab, driven through its slider.

Starts JupyterLab headless on 127.0.0.1 (serving a temporary copy of notebook 02), opens it in
headless Chromium via selenium, runs it with the menu's Run > Run All Cells, then moves the
inspector's "example" slider with the keyboard and with its editable readout, and checks each
time that the rendered table is exactly what `helpers.widgets.inspector.token_rows` gives for that
example. A second test runs a small notebook with the inspector and the review tool in a window
1280 px wide (JupyterLab's default layout, file browser open) and checks that nothing overflows
its output area or overlaps, and that the review tool's buttons redraw its entry. Screenshots go
to $BROWSER_ARTIFACTS (default: a temp folder, printed).

Needs /usr/bin/chromium, /usr/bin/chromedriver and selenium (`.ci/browser-deps.sh`); skipped
without them, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers.data import load_instruction_data, split_data
from helpers.widgets.inspector import token_rows
from tests.browser_support import chromium, jupyterlab, missing_browser, wait_for

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_batching_and_masking.ipynb"
# The inspector cell's arguments (notebook 02, section 5).
INSPECTOR_OPTIONS: dict[str, Any] = {"style": "alpaca", "mask_prompt": True, "extra_padding": 2}

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
# Its table (a plain HTML output that the controls redraw) as text: [summary line, [[cell text,
# ...] per row]]; exact textContent, no reflow.
READ_TABLE_JS = """
const out = arguments[0];
const table = out.querySelector('.jp-RenderedHTMLCommon table');
if (!table) return null;
const summary = [...table.parentElement.querySelectorAll('p')].find(
  p => p.textContent.includes(' positions: '));
const rows = [...table.querySelectorAll('tr')].slice(1).map(
  tr => [...tr.querySelectorAll('td')].map(td => td.textContent));
return [summary ? summary.textContent : null, rows];
"""
# What does not fit in an output area (arguments[0]), as readable lines; [] when all fits:
# something sideways-scrolled or past its right edge, overlapping widgets in a row or column,
# a table cell whose text overflows it or runs into the next cell's text.
LAYOUT_PROBLEMS_JS = """
const out = arguments[0];
const edge = out.getBoundingClientRect().right;
const problems = [];
const name = el => el.tagName.toLowerCase() + (el.className && el.className.baseVal === undefined
  ? '.' + String(el.className).trim().split(/\\s+/).slice(0, 2).join('.') : '');
const visible = r => r.width > 0 && r.height > 0;
const textBox = el => {
  const range = document.createRange();
  range.selectNodeContents(el);
  const r = range.getBoundingClientRect();
  return visible(r) ? r : null;
};
for (const el of [out, ...out.querySelectorAll('.jp-OutputArea-output, td, th')]) {
  if (el.scrollWidth > el.clientWidth + 1)
    problems.push(`${name(el)} is wider than its box: scrollWidth ${el.scrollWidth} > ` +
                  `clientWidth ${el.clientWidth} (${el.textContent.trim().slice(0, 40)})`);
}
for (const el of out.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (visible(r) && r.right > edge + 1)
    problems.push(`${name(el)} ends at x=${Math.round(r.right)}, past the output area's ` +
                  `right edge x=${Math.round(edge)} (${el.textContent.trim().slice(0, 40)})`);
}
for (const box of out.querySelectorAll('.widget-hbox, .widget-vbox')) {
  const kids = [...box.children].map(k => [k, k.getBoundingClientRect()])
    .filter(([k, r]) => visible(r));
  for (let i = 0; i < kids.length; i++) for (let j = i + 1; j < kids.length; j++) {
    const [a, ra] = kids[i], [b, rb] = kids[j];
    if (ra.left < rb.right - 1 && rb.left < ra.right - 1 &&
        ra.top < rb.bottom - 1 && rb.top < ra.bottom - 1)
      problems.push(`${name(a)} and ${name(b)} overlap (${a.textContent.trim().slice(0, 20)} / ` +
                    `${b.textContent.trim().slice(0, 20)})`);
  }
}
for (const tr of out.querySelectorAll('table tr')) {
  const cells = [...tr.children];
  for (let i = 0; i + 1 < cells.length; i++) {
    const a = textBox(cells[i]), b = textBox(cells[i + 1]);
    if (a && b && a.bottom > b.top && b.bottom > a.top && a.right + 4 > b.left)
      problems.push(`table columns ${i} and ${i + 1} run together: ` +
                    `${JSON.stringify(cells[i].textContent)} | ` +
                    `${JSON.stringify(cells[i + 1].textContent)}`);
  }
}
return problems.slice(0, 15);
"""
# JupyterLab's default layout (file browser open) in a window of this width.
NARROW_WIDTH = 1280


def _expected(entry: dict[str, str]) -> tuple[str, list[list[str]]]:
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


def _click_menu(driver: Any, menu: str, entry: str) -> None:
    """Click `menu` in JupyterLab's menu bar, then its (enabled) entry labelled `entry`."""
    from selenium.webdriver.common.by import By

    def find(selector: str, label: str, within: Any = driver) -> Any:
        for el in within.find_elements(By.CSS_SELECTOR, selector):
            if el.text.strip() == label:
                return el
        return None

    wait_for(f"the {menu!r} menu", lambda: find("#jp-MainMenu .lm-MenuBar-item", menu), 20).click()

    def enabled_entry() -> Any:
        for item in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu .lm-Menu-item"):
            if "lm-mod-disabled" in (item.get_attribute("class") or ""):
                continue
            if find(".lm-Menu-itemLabel", entry, within=item):
                return item
        return None

    wait_for(f"the menu entry {menu} > {entry}", enabled_entry, 20).click()


def _run_all_cells(driver: Any, n_code: int, timeout: float) -> None:
    """Run > Run All Cells, wait until every code cell ran and the kernel is idle, no errors."""
    from selenium.webdriver.common.by import By

    _click_menu(driver, "Run", "Run All Cells")

    def all_ran() -> bool:
        prompts = _code_prompts(driver)
        done = len(prompts) == n_code and all(p.strip("[]:").isdigit() for p in prompts)
        return done and _kernel_idle(driver)

    wait_for("Run All Cells to finish", all_ran, timeout, interval=1)
    errors = driver.find_elements(
        By.CSS_SELECTOR,
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']",
    )
    assert not errors, f"a cell raised: {errors[0].text[:2000]}"


def _with_slider(output: Any) -> Any:
    """`output` if it holds the rendered inspector (its slider labelled "example")."""
    from selenium.webdriver.common.by import By

    if output is None:
        return None
    labels = output.find_elements(By.CSS_SELECTOR, ".widget-slider .widget-label")
    return output if any(label.text.strip() == "example" for label in labels) else None


def _kernel_idle(driver: Any) -> bool:
    from selenium.webdriver.common.by import By

    status = driver.find_element(By.ID, "jp-main-statusbar").text
    return "Python 3 | Idle" in status


def _code_prompts(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
        ".map(p => p.textContent.trim());"
    )


def _assert_fits(driver: Any, output: Any, what: str, shot: Path) -> None:
    """Screenshot `output` (a cell's output area) and fail on anything LAYOUT_PROBLEMS_JS finds."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", output)
    output.screenshot(str(shot))
    problems = driver.execute_script(LAYOUT_PROBLEMS_JS, output)
    width = driver.execute_script("return window.innerWidth;")
    assert not problems, f"{what} does not fit a {width}px window ({shot}):\n" + "\n".join(problems)


def _narrow_window(driver: Any) -> None:
    """Resize to NARROW_WIDTH and check the page really is that wide (headless: no frame)."""
    driver.set_window_size(NARROW_WIDTH, 1800)
    width = driver.execute_script("return window.innerWidth;")
    assert abs(width - NARROW_WIDTH) <= 16, f"window.innerWidth is {width}, not ~{NARROW_WIDTH}"


def test_inspector_follows_its_slider_in_jupyterlab(
    chapter_data_path: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
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
            _run_all_cells(driver, n_code, timeout=150)

            inspector = wait_for(
                "the inspector widget with its 'example' slider",
                lambda: _with_slider(driver.execute_script(FIND_INSPECTOR_OUTPUT_JS)),
                30,
            )
            assert "Error displaying widget" not in inspector.text

            def table_is(index: int) -> None:
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
            _narrow_window(driver)
            table_is(7)
            _assert_fits(driver, inspector, "the inspector", artifacts / "02_inspector_1280.png")
        except BaseException:
            driver.save_screenshot(str(artifacts / "02_inspector_failure.png"))
            print(f"JupyterLab log:\n{lab.log.read_text(errors='replace')[-5000:]}")
            raise
    print(f"browser test took {time.monotonic() - started:.0f}s")


# The small notebook of the 1280 px test: the inspector as notebook 02 makes it, and the review
# tool as notebook 05 does, on an entry with long text and a long unbroken word (a URL).
WIDGETS_NOTEBOOK_CELLS = [
    """import json
from helpers.data import load_instruction_data, split_data
from helpers.review.compare import ReviewTool
from helpers.widgets.inspector import TokenInspector

validation = split_data(load_instruction_data({data!r})).validation
entries = json.loads(open({responses!r}, encoding="utf-8").read())[:3]
entries[0] = {{**entries[0], "model_response": entries[0]["model_response"] * 12
              + " https://example.org/" + "very-long-path-" * 20}}""",
    """inspector = TokenInspector(
    validation, index=0, style="alpaca", mask_prompt=True, extra_padding=2
)
inspector""",
    """tool = ReviewTool(entries, "reviews/me.jsonl", reviewer="me")
tool""",
    """five = ReviewTool(entries, "reviews/five.jsonl", reviewer="five", scale="1-5")
five""",
]
FIND_REVIEW_OUTPUT_JS = FIND_INSPECTOR_OUTPUT_JS.replace(
    "inspector = TokenInspector(", "tool = ReviewTool("
)


FIND_FIVE_OUTPUT_JS = FIND_INSPECTOR_OUTPUT_JS.replace("inspector = TokenInspector(", "five = ")


def _widgets_notebook(folder: Path, data: Path, responses: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    sources = [WIDGETS_NOTEBOOK_CELLS[0].format(data=str(data), responses=str(responses))]
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources + WIDGETS_NOTEBOOK_CELLS[1:]]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = folder / "widgets_at_1280.ipynb"
    nbformat.write(nb, path)
    return path


def test_inspector_and_review_tool_fit_at_1280px(
    chapter_data_path: Path,
    responses_path: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _require_browser()
    artifacts = _artifacts()
    print(f"browser test artefacts (screenshots): {artifacts}")
    record_property("artifacts", str(artifacts))
    failure = artifacts / "widgets_1280_failure.png"
    failure.unlink(missing_ok=True)  # from an earlier run
    source = tmp_path / "source"
    source.mkdir()
    notebook = _widgets_notebook(source, chapter_data_path, responses_path)
    env = {"MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    for name in ("TIKTOKEN_CACHE_DIR", "HF_HUB_OFFLINE"):
        if os.environ.get(name):
            env[name] = os.environ[name]

    with jupyterlab([notebook], tmp_path, env) as lab, chromium(tmp_path) as driver:
        try:
            _narrow_window(driver)
            driver.get(lab.open_url(notebook.name))
            n_code = len(WIDGETS_NOTEBOOK_CELLS)
            wait_for("the notebook's code cells", lambda: len(_code_prompts(driver)) == n_code, 60)
            wait_for("the Python 3 kernel to be idle", lambda: _kernel_idle(driver), 60)
            _run_all_cells(driver, n_code, timeout=120)

            inspector = wait_for(
                "the inspector widget with its 'example' slider",
                lambda: _with_slider(driver.execute_script(FIND_INSPECTOR_OUTPUT_JS)),
                30,
            )
            assert inspector.text.startswith("Live widget: the controls respond once you run")
            validation = split_data(load_instruction_data(chapter_data_path)).validation
            assert driver.execute_script(READ_TABLE_JS, inspector) == list(_expected(validation[0]))
            _assert_fits(driver, inspector, "the inspector", artifacts / "inspector_1280.png")
            # The slider redraws the table (a plain output) while the kernel runs.
            handle = inspector.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
            handle.click()
            handle.send_keys(Keys.ARROW_RIGHT)
            wait_for(
                "the table of validation example 1",
                lambda: (
                    driver.execute_script(READ_TABLE_JS, inspector)
                    == list(_expected(validation[1]))
                ),
                20,
            )
            _assert_fits(driver, inspector, "the inspector", artifacts / "inspector_1280_next.png")

            def review_tool(find_js: str) -> Any:
                out = driver.execute_script(find_js)
                if out is None or not out.find_elements(By.CSS_SELECTOR, ".widget-toggle-button"):
                    return None
                return out

            five = wait_for("the 1-5 review tool", lambda: review_tool(FIND_FIVE_OUTPUT_JS), 30)
            _assert_fits(driver, five, "the 1-5 review tool", artifacts / "review_tool_1280_5.png")
            tool = wait_for(
                "the review tool with its rating buttons",
                lambda: review_tool(FIND_REVIEW_OUTPUT_JS),
                30,
            )
            assert tool.text.startswith("Live widget: the rating buttons respond once you run")
            assert "0/3 rated · reviewer me" in tool.text and "Entry 0" in tool.text
            _assert_fits(driver, tool, "the review tool", artifacts / "review_tool_1280.png")

            # The buttons redraw the entry (a plain output) while the kernel runs.
            for button in tool.find_elements(By.CSS_SELECTOR, ".widget-toggle-button"):
                if button.text.strip() == "correct":
                    button.click()
            for button in tool.find_elements(By.CSS_SELECTOR, "button"):
                if button.text.strip() == "Save & next":
                    button.click()
            wait_for("the entry after saving", lambda: "Entry 1" in tool.text, 20)
            assert "1/3 rated · reviewer me" in tool.text
            _assert_fits(driver, tool, "the review tool", artifacts / "review_tool_1280_next.png")
            saved = (lab.root / "reviews" / "me.jsonl").read_text().splitlines()
            assert [json.loads(line)["rating"] for line in saved] == ["correct"]
        except BaseException:
            driver.save_screenshot(str(failure))
            print(f"JupyterLab log:\n{lab.log.read_text(errors='replace')[-5000:]}")
            raise
