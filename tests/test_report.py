"""minivdit.report in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): the tiny
model's comparison page (videos load and move in lockstep from one control, chunk marks, sorting, escaping, nothing
pointing outside the folder), the page served over http, the rebuild from disk of a sweep layout, the analysis page."""
import functools
import http.server
import json
import re
import shutil
import threading
import time

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from minivdit.analysis import MAStats, write_plots
from minivdit.interventions import TokenLayout
from minivdit.report import main as report_main
from minivdit.report import write_report
from minivdit.video import write_json
from samplers import compare

PROMPT = 'a red ball <script>document.title="pwned"</script> rolls & "stops"'
FRAMES, FPS = 9, 8  # 9 frames: latent frames 0 | 1-4 | 5-8, chunk boundaries before frames 1 and 5


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """compare.py on the tiny default: 3 methods, 1 prompt (with a <script> in it), 1 seed."""
    out = tmp_path_factory.mktemp("report") / "cmp"
    compare.main(["--methods", "cfg,dg,cfg+stas", "--stas-steps", "2", "--seeds", "0", "--steps", "2", "--frames",
                  str(FRAMES), "--height", "32", "--width", "32", "--fps", str(FPS), "--prompt", PROMPT,
                  "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, ("the report tests need Debian's chromium and chromium-driver: "
                                 "apt-get install -y chromium chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1600",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(driver))
    yield d
    d.quit()


def wait(d, script, timeout=20.0):
    """Poll a JS expression until it returns a truthy value; return it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := d.execute_script(f"return {script}"):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


TIMES = "[...document.querySelectorAll('video')].map(v => v.currentTime)"
LOADED = "[...document.querySelectorAll('video')].every(v => v.readyState >= 1 && isFinite(v.duration))"


def links(d) -> list[str]:
    """Every URL the page refers to: element attributes, inline-style url(...), and the resources it fetched."""
    return d.execute_script("""
        const urls = [];
        for (const el of document.querySelectorAll('*')) {
          for (const a of ['src', 'href', 'poster', 'action', 'srcset', 'data']) if (el.hasAttribute(a)) urls.push(el.getAttribute(a));
          const style = el.getAttribute('style') || '';
          for (const m of style.matchAll(/url\\(([^)]*)\\)/g)) urls.push(m[1]);
        }
        for (const s of document.querySelectorAll('style')) for (const m of s.textContent.matchAll(/url\\(([^)]*)\\)|@import/g)) urls.push(m[0]);
        return urls;""")


def test_comparison_page_in_chromium(study, browser, tmp_path):
    d = browser
    page = study / "report.html"
    assert page.is_file()  # compare.py wrote it
    d.get(page.as_uri())

    # one row of three videos, labelled by method in the order of results.csv, each with known duration
    assert len(d.find_elements(By.CSS_SELECTOR, "section.row")) == 1
    assert len(d.find_elements(By.TAG_NAME, "video")) == 3
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "figcaption")] == ["cfg", "dg", "cfg+stas"]
    wait(d, LOADED)
    durations = d.execute_script("return [...document.querySelectorAll('video')].map(v => v.duration)")
    assert durations == pytest.approx([FRAMES / FPS] * 3, abs=1e-3)
    marks = [int(e.get_attribute("data-frame")) for e in d.find_elements(By.CSS_SELECTOR, ".marks span")]
    assert marks == [1, 5]  # the latent-chunk boundaries of the Wan VAE (stride 4)

    # the one scrubber moves every video to the middle of the chosen frame
    scrub = d.find_element(By.CSS_SELECTOR, "input.scrub")
    ActionChains(d).move_to_element_with_offset(scrub, scrub.size["width"] // 4, 0).click().perform()
    k = int(wait(d, "Number(document.querySelector('input.scrub').value)"))
    assert 4 <= k <= 7  # three quarters along 0..8
    assert wait(d, f"{TIMES}.every(t => Math.abs(t - {(k + 0.5) / FPS}) < 1e-3)")
    d.find_element(By.CSS_SELECTOR, "button.prev").click()  # frame step, for every video
    assert wait(d, f"{TIMES}.every(t => Math.abs(t - {(k - 0.5) / FPS}) < 1e-3)")
    assert f"frame {k - 1} / {FRAMES - 1}" in d.find_element(By.CSS_SELECTOR, ".readout").text

    # play moves all of them and decodes frames; pause stops them together on one frame
    d.find_element(By.CSS_SELECTOR, "button.play").click()
    wait(d, f"{TIMES}.every(t => Math.abs(t - {(k - 0.5) / FPS}) > 0.01)")
    d.find_element(By.CSS_SELECTOR, "button.play").click()
    assert wait(d, "[...document.querySelectorAll('video')].every(v => v.paused && v.webkitDecodedFrameCount > 0)")
    times = wait(d, f"(t => t.every(x => x === t[0]) && t)({TIMES})")
    assert len(times) == 3

    # sorting a summary column reorders the rows by its values, ascending then descending
    table = d.find_element(By.ID, "summary")
    heads = [b.get_attribute("textContent") for b in table.find_elements(By.CSS_SELECTOR, "thead th button")]
    col = heads.index("seconds_per_step")
    order = lambda: [(r.find_elements(By.TAG_NAME, "td")[0].text, float(r.find_elements(By.TAG_NAME, "td")[col]  # noqa: E731
                      .get_attribute("data-v"))) for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    before = order()
    table.find_elements(By.CSS_SELECTOR, "thead th button")[col].click()
    up = order()
    table.find_elements(By.CSS_SELECTOR, "thead th button")[col].click()
    down = order()
    assert sorted(up) == sorted(before) and [v for _, v in up] == sorted(v for _, v in before) and down == up[::-1]
    assert up != before or down != before  # three distinct values: one of the two orders moved a row
    best = [r.find_elements(By.TAG_NAME, "td")[col] for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert [float(c.get_attribute("data-v")) for c in best if "best" in c.get_attribute("class")] == [up[0][1]]
    notes = d.find_elements(By.CSS_SELECTOR, "ol.notes li")  # a footnote per metric column, with its direction
    assert any("seconds_per_step" in n.text and "lower = faster" in n.text for n in notes)

    # escaping: the prompt is text, its <script> never ran; the page's only script is the template's
    assert d.find_element(By.CSS_SELECTOR, ".prompt").text == PROMPT
    assert "pwned" not in d.title and len(d.find_elements(By.TAG_NAME, "script")) == 1

    # nothing points outside the folder: relative links only, and every fetched resource lies under it
    for url in links(d):
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^/|(^|/)\.\.(/|$)|@import", url, re.I), url
    d.save_screenshot(str(tmp_path / "report.png"))  # the test artifact
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_page_works_served_over_http(study, browser):
    """`python -m http.server` in the folder: the same relative links load the videos; scrubbing still works."""
    handler = functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                                     {"log_message": lambda *a: None}), directory=str(study))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/report.html")
        wait(browser, LOADED)  # http.server answers no range request: the page loads each video whole to seek it
        assert wait(browser, "[...document.querySelectorAll('video')].every(v => v.seekable.length && "
                             "v.seekable.end(0) >= v.duration - 1e-3)")
        assert len(browser.find_elements(By.TAG_NAME, "video")) == 3
        assert wait(browser, "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)")
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        root = f"http://127.0.0.1:{server.server_address[1]}/"
        assert len(fetched) >= 3 + 2 and all(u.startswith(root) for u in fetched), fetched  # videos and plots, here
        browser.find_element(By.CSS_SELECTOR, "button.next").click()
        assert wait(browser, f"{TIMES}.every(t => Math.abs(t - {1.5 / FPS}) < 1e-3)")
    finally:
        server.shutdown()
        server.server_close()


def test_rebuild_from_disk_for_a_sweep_layout(study, tmp_path, capsys):
    """A sweep layout (job folders at any depth, no tables): the page shows exactly the videos on disk, one row per
    (prompt, seed), and is refreshed by `python -m minivdit.report DIR`."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        for alpha in (1, 2):
            job = sweep / "jobs" / f"s{seed}" / f"stas-a{alpha}"
            job.mkdir(parents=True)
            side = json.loads((study / "p0_s0" / "cfg+stas.json").read_text())
            side.update(method_label=f"cfg+stas:alpha={alpha}", seed=seed)
            write_json(job / "video.json", side)
            shutil.copy(study / "p0_s0" / "cfg+stas.mp4", job / "video.mp4")
    (sweep / "jobs" / "s1" / "orphan.json").write_text(json.dumps({"method_label": "no video"}))
    report_main([str(sweep)])
    assert str(sweep / "report.html") in capsys.readouterr().out
    html = (sweep / "report.html").read_text()
    assert html.count("<video ") == 4 and html.count('<section class="row"') == 2 and "no video" not in html
    assert 'src="jobs/s1/stas-a2/video.mp4"' in html and "cfg+stas:alpha=2" in html
    shutil.rmtree(sweep / "jobs" / "s1")  # a job removed: the rebuilt page drops it
    write_report(sweep)
    html = (sweep / "report.html").read_text()
    assert html.count("<video ") == 2 and html.count('<section class="row"') == 1
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="compare.py or analyze.py"):
        write_report(tmp_path / "empty")


def test_analysis_page(tmp_path, browser):
    """An analysis report.json with an injected MA channel: the flags to copy, the tables and the plots."""
    layout = TokenLayout(frames=3, height=4, width=5)
    dim, steps = 256, 2
    stats = MAStats(layout, dim, blocks=[0, 1], steps=steps, p=10.0)
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        for b in (0, 1):
            h = torch.rand(2, layout.num_tokens, dim, generator=g, dtype=torch.float64)
            h[..., 7] *= 200.0  # a massive channel
            stats(b, h)
        stats.next_step()
    report = stats.report()
    report["run"] = {"prompts": ["a <b>bold</b> fox"]}
    out = tmp_path / "ma"
    write_plots(stats, report, out)
    write_json(out / "report.json", report)
    write_report(out)
    browser.get((out / "report.html").as_uri())
    assert report["stas_flags"]  # the injected channel was found
    flags = [e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, ".flag input")]
    assert flags == [report["stas_flags"], report["dg_flags"]]
    assert "--stas-dims 7" in flags[0]
    assert len(browser.find_elements(By.TAG_NAME, "video")) == 0
    assert wait(browser, "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0) && "
                         "document.querySelectorAll('img').length")
    assert len(browser.find_elements(By.TAG_NAME, "img")) == 3
    slots = browser.find_elements(By.CSS_SELECTOR, "section.expert table")[0].find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(slots) == len(report["slots"]) == 4 and all("7 (" in r.text for r in slots)
    assert "a <b>bold</b> fox" in browser.find_element(By.CSS_SELECTOR, "section.expert details pre") \
        .get_attribute("textContent")
