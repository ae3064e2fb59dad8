"""Check the offline site in a real browser: headless Chromium, driven over the DevTools protocol, opens every page.

For each page it reports what a reader would hit:

* **loads**: the page's load event fires;
* **no request leaves the site**: every request the page makes is recorded (``Network.requestWillBeSent``); anything
  but ``file:``, ``data:`` and ``blob:`` is a failure, and every ``src``/``href`` in the page must be a relative link to
  a file that exists (the gallery's links included);
* **no console error**: ``console.error`` calls, uncaught exceptions and the browser's own error log entries (a failed
  load) are failures; warnings and logs are not (CircuitsVis's bundle warns about itself);
* **figures render**: every plotly figure's ``<div>`` holds an SVG with a drawn trace (a line, bar, marker or heat-map
  image) and every CircuitsVis view's ``<div>`` has content, checked in the live page after its scripts ran;
* screenshots of chosen pages are written for a person to look at.

The browser is the Chromium that ``make setup`` installs (the one kaleido uses), driven by ``choreographer`` (kaleido's
own dependency), so nothing is added to the environment. ``python -m mechfin_utils.reporting.website_check site/ [--screenshots DIR]``
prints one line per page and exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from mechfin_utils.reporting.static_export import find_browser

LINK_RE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
RENDER_CHECK = """(() => {
  const plots = [...document.querySelectorAll('div[id^="mechfin-plotly-"]')].map(d => ({id: d.id,
      drawn: !!d.querySelector('svg.main-svg') && !!d.querySelector('.trace, .hm, image, .point, .bars path')}));
  const views = [...document.querySelectorAll('div[id^="circuits-vis-"]')].map(d => ({id: d.id,
      drawn: d.childElementCount > 0}));
  return JSON.stringify({plots, views});
})()"""
SETTLE_S = 0.5  # after the load event: module scripts (CircuitsVis) render on the next tasks


@dataclass
class PageCheck:
    page: Path
    problems: list[str] = field(default_factory=list)
    plotly_figures: int = 0
    circuitsvis_views: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def local_link_problems(page: Path, text: str) -> list[str]:
    """Every ``src``/``href`` of ``page`` that is not a relative link to an existing file (anchors and ``data:``
    URIs are fine)."""
    problems = []
    for link in LINK_RE.findall(text):
        if link.startswith(("#", "data:", "javascript:")):
            continue
        parsed = urlparse(link)
        if parsed.scheme or link.startswith("//"):
            problems.append(f"link leaves the site: {link[:100]}")
            continue
        target = (page.parent / unquote(parsed.path)).resolve()
        if not target.exists():
            problems.append(f"broken link: {link[:100]}")
    return problems


async def _check_in_tab(browser, page: Path, screenshot: Path | None) -> PageCheck:
    result = PageCheck(page)
    result.problems += local_link_problems(page, page.read_text(errors="replace"))
    tab = await browser.create_tab("")
    problems = result.problems

    async def on_console(message):
        params = message["params"]
        if params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            problems.append(f"console.{params['type']}: {text[:200]}")

    async def on_exception(message):
        details = message["params"]["exceptionDetails"]
        description = details.get("exception", {}).get("description") or details.get("text", "")
        problems.append(f"uncaught: {description.splitlines()[0][:200] if description else details}")

    async def on_request(message):
        url = message["params"]["request"]["url"]
        if not url.startswith(LOCAL_SCHEMES):
            problems.append(f"request leaves the site: {url[:150]}")

    async def on_log(message):
        entry = message["params"]["entry"]
        if entry.get("level") == "error":
            problems.append(f"browser error: {entry.get('text', '')[:200]}")

    tab.subscribe("Runtime.consoleAPICalled", on_console)
    tab.subscribe("Runtime.exceptionThrown", on_exception)
    tab.subscribe("Network.requestWillBeSent", on_request)
    tab.subscribe("Log.entryAdded", on_log)
    for domain in ("Runtime", "Network", "Log", "Page"):
        await tab.send_command(f"{domain}.enable")
    await tab.send_command(
        "Emulation.setDeviceMetricsOverride",
        params={"width": 1280, "height": 1800, "deviceScaleFactor": 1, "mobile": False},
    )
    loaded = tab.subscribe_once("Page.loadEventFired")
    await tab.send_command("Page.navigate", params={"url": page.resolve().as_uri()})
    try:
        await asyncio.wait_for(loaded, 90)
    except TimeoutError:
        problems.append("did not load within 90 s")
        await browser.close_tab(tab)
        return result
    await asyncio.sleep(SETTLE_S)
    answer = await tab.send_command("Runtime.evaluate", params={"expression": RENDER_CHECK, "returnByValue": True})
    rendered = json.loads(answer["result"]["result"]["value"])
    result.plotly_figures, result.circuitsvis_views = len(rendered["plots"]), len(rendered["views"])
    problems += [f"plotly figure {p['id']} is blank" for p in rendered["plots"] if not p["drawn"]]
    problems += [f"CircuitsVis view {v['id']} is empty" for v in rendered["views"] if not v["drawn"]]
    if screenshot is not None:
        shot = await tab.send_command("Page.captureScreenshot", params={"format": "png"})
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["result"]["data"]))
    await browser.close_tab(tab)
    return result


TABS_AT_ONCE = 3
"""Pages checked side by side, each in its own tab of one browser (Chromium renders tabs in processes of their own):
the site's pages are independent, and on 2 cores three tabs take about half the time of one after another."""


async def _check_all(browser_path: str, pages: list[Path], shots: dict[Path, Path]) -> list[PageCheck]:
    from choreographer import Browser

    async with Browser(path=browser_path, headless=True) as browser:
        slots = asyncio.Semaphore(TABS_AT_ONCE)

        async def check(page: Path) -> PageCheck:
            async with slots:
                return await _check_in_tab(browser, page, shots.get(page))

        return list(await asyncio.gather(*(check(page) for page in pages)))  # in the pages' order


def check_page(page: Path, browser: str, screenshot: Path | None = None) -> PageCheck:
    """Open ``page`` in headless Chromium and check it (see the module docstring)."""
    return asyncio.run(_check_all(browser, [page], {page: screenshot} if screenshot else {}))[0]


def check_site(site: Path, screenshots: Path | None = None, screenshot_pages: int = 3) -> list[PageCheck]:
    """Check every HTML page of ``site`` in one browser; screenshots of the entry page and of the first pages with
    figures."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chrome/Chromium found: `make setup` installs Debian's chromium (see the README)")
    pages = sorted(site.rglob("*.html"))
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {site}: build the site first (make site)")
    wanted = [site / "index.html"]
    for page in pages:
        if len(wanted) >= screenshot_pages:
            break
        if page.parent != site and page.name != "index.html" and "plotly-figure" in page.read_text(errors="replace"):
            wanted.append(page)
    shots = {}
    if screenshots is not None:
        shots = {
            p: screenshots / (p.relative_to(site).as_posix().replace("/", "__").removesuffix(".html") + ".png")
            for p in wanted
        }
    return asyncio.run(_check_all(browser, pages, shots))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechfin_utils.reporting.website_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args(argv)
    checks = check_site(args.site, args.screenshots)
    for check in checks:
        status = "ok" if check.ok else "FAIL"
        print(
            f"{status:4} {check.page.relative_to(args.site)} ({check.plotly_figures} plotly, {check.circuitsvis_views} CircuitsVis)"
        )
        for problem in check.problems:
            print(f"       {problem}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
