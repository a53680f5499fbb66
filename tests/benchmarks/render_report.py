"""Open output/report.html in headless Chromium, check that every image loads and no section is empty, and write a
full-page screenshot.

python tests/benchmarks/render_report.py [--output-dir output] [--screenshot PATH] [--width 1280] [--browser PATH]

Needs Debian's `chromium` (apt-get install -y chromium). A copy of the page with a small checking script is loaded
from the same folder (so relative image paths resolve), its DOM dumped after load, and the script's verdict read
back; then the page is shot at its full height. Exit 1 when an image does not load or a section is empty. The last
line reads `render: N images loaded, M sections filled, screenshot PATH (W x H)`.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
         "--virtual-time-budget=15000"]
CHECK = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0}));
  const sections = [...document.querySelectorAll("section")].map(s => ({id: s.id,
      text: s.innerText.replace(/\\s+/g, " ").trim().length,
      heading: s.querySelector("h2") ? s.querySelector("h2").innerText.trim() : ""}));
  const tables = [...document.querySelectorAll("section[id^=table_]")].map(s => ({id: s.id,
      rows: s.querySelectorAll("tbody tr").length, missing: s.querySelectorAll(".missing").length}));
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({images, sections, tables, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output")
    p.add_argument("--screenshot", default="", help="default: OUTPUT/report_screenshot.png")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--browser", default="")
    p.add_argument("--timeout", type=int, default=300)
    return p.parse_args()


def browser(path):
    found = path or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), "")
    if not found:
        sys.exit("no Chromium found: apt-get update && apt-get install -y chromium (or pass --browser PATH)")
    return found


def run(cmd, timeout):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def inspect(chrome, page, timeout):
    """The checking script's verdict on a copy of the page in the same folder."""
    html = page.read_text(encoding="utf-8")
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, prefix=".render_", delete=False,
                                     encoding="utf-8") as f:
        f.write(html.replace("</body>", CHECK + "</body>"))
        probe = Path(f.name)
    try:
        dom = run([chrome, *FLAGS, "--dump-dom", probe.resolve().as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S)
    if not found:
        sys.exit("the page did not finish loading in the browser (no check result in the DOM)")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def problems(verdict):
    bad = [f"image does not load: {i['src']}" for i in verdict["images"] if not i["ok"]]
    bad += [f"section is empty: #{s['id']}" for s in verdict["sections"] if s["text"] <= len(s["heading"]) + 5]
    bad += [f"table section has no rows and names no missing run: #{t['id']}" for t in verdict["tables"]
            if t["rows"] == 0 and not t["missing"]]
    return bad


def main():
    args = parse_args()
    out = Path(args.output_dir)
    page = out / "report.html"
    if not page.is_file():
        sys.exit(f"{page} is missing: run python main.py --stages report --output-dir {out}")
    chrome = browser(args.browser)
    verdict = inspect(chrome, page, args.timeout)
    shot = Path(args.screenshot or out / "report_screenshot.png").resolve()
    height = max(800, int(verdict["height"]))
    run([chrome, *FLAGS, f"--screenshot={shot}", f"--window-size={args.width},{height}", page.resolve().as_uri()],
        args.timeout)
    bad = problems(verdict)
    for line in bad:
        print(f"FAIL {line}")
    tables = ", ".join(f"{t['id']} {t['rows']} rows" for t in verdict["tables"])
    print(f"tables: {tables}")
    filled = sum(1 for s in verdict["sections"]) - sum(1 for b in bad if b.startswith("section"))
    print(f"render: {sum(i['ok'] for i in verdict['images'])} images loaded, {filled} sections filled, "
          f"screenshot {shot} ({args.width} x {height})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
