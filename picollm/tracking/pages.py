"""A report as one self-contained HTML page: markdown (a flow's report.md) rendered, its figures inlined, so
MLflow's artifact viewer shows it with no other artifact (compare, DPO and sweep reports)."""

from __future__ import annotations

import base64
import html
import re

# MLflow's artifact viewer shows .md as plain text, and an HTML page's relative image links do not resolve in
# its sandboxed frame: the figures go in as data URIs.
_IMAGE = re.compile(r"!\[(.*?)\]\(([^)\s]+)\)")  # captions may hold brackets: "colour scale [0, 1]"
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1f2328; line-height: 1.45; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr:nth-child(even) { background: #f6f8fa; }
img { max-width: 100%; border: 1px solid #d0d7de; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
blockquote { margin: 12px 0; padding: 6px 14px; border-left: 5px solid #bf8700; background: #fff8c5; }
"""


def report_html(markdown: str, figures: dict[str, bytes], title: str = "picollm report") -> str:
    """`markdown` (report.md) as one self-contained HTML page: tables rendered, and every image whose
    path is a key of `figures` (artifact path -> PNG bytes) embedded, so it needs no other artifact."""
    from markdown_it import MarkdownIt

    # The images go in after rendering: markdown-it (pure Python) parsing megabytes of base64 took most of
    # a comparison's reporting time. The placeholder is a plain link target that survives rendering as is.
    uris: dict[str, str] = {}

    def placeholder(m: re.Match[str]) -> str:
        png = figures.get(m.group(2))
        if png is None:
            return m.group(0)
        key = f"picollm-figure-{len(uris)}.png"
        uris[key] = f"data:image/png;base64,{base64.b64encode(png).decode()}"
        return f"![{m.group(1)}]({key})"

    body = MarkdownIt("commonmark").enable("table").render(_IMAGE.sub(placeholder, markdown))
    for key, uri in uris.items():
        body = body.replace(f'src="{key}"', f'src="{uri}"')
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )
