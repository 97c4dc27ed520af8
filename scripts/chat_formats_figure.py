"""Draw images/chat-formats.svg: one conversation in the prompt format of each of the five families.

The prompts come from helpers.formats (the code the server runs), so the figure cannot drift from it;
tests/test_lessons.py checks that the committed file is what this script writes. Run it after changing
a format:

    python scripts/chat_formats_figure.py            # writes images/chat-formats.svg
"""

from __future__ import annotations

import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.formats import Marker, Special, Text, get_chat_format  # noqa: E402
from helpers.registry import MODELS  # noqa: E402

OUT = ROOT / "images" / "chat-formats.svg"
CONVERSATION = [
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！"},
    {"role": "user", "content": "讲个笑话"},
]
WIDTH, LINE, TOP = 1000, 20, 64
COLORS = {"control": "#c0560f", "plain-marker": "#1f6fb2", "bos": "#888888", "text": "#222222", "note": "#2b7a48"}
# what each family does with a system message
SYSTEM = {
    "qwen": "ChatML；没有 system 消息时用默认提示",
    "xverse": "没有 system 角色：带 system 的请求返回 400",
    "bluelm": "system 写成开头的 [|SYSTEM|]:内容",
    "internlm2": "没有 system 消息时用很长的默认提示；空的 system 消息 = 不要 system 段",
    "minicpm": "没有 system 标记：system 的内容作为普通文字写在最前面",
}


def styled_lines(family: str) -> list[list[tuple[str, str]]]:
    """The prompt as lines of (style, text) pieces; control tokens styled apart from text."""
    fmt = get_chat_format(family)
    pieces: list[tuple[str, str]] = []
    note = None  # drawn after the control token that closes the default system prompt
    if fmt.bos_added_by_tokenizer:
        pieces.append(("bos", "<s>"))
    for seg in fmt.segments(fmt.check(CONVERSATION)):
        if isinstance(seg, (Special, Marker)):
            pieces.append(("control", seg.token))
            if note:
                pieces.append(("note", note))
                note = None
            continue
        text = seg.text
        if fmt.default_system and fmt.default_system in text:
            first_line = fmt.default_system.split("\n")[0]
            shortened = first_line != fmt.default_system
            text = text.replace(fmt.default_system, first_line + (" …" if shortened else ""))
            note = "   ← 默认 system 提示" + ("（共三行，此处省略）" if shortened else "")
        # MiniCPM's role markers are ordinary text, drawn in their own colour
        for marker in fmt.stop_strings if family == "minicpm" else ():
            text = text.replace(marker, f"\0{marker}\0")
        for i, part in enumerate(text.split("\0")):
            if part:
                pieces.append(("plain-marker" if i % 2 else "text", part))
    lines: list[list[tuple[str, str]]] = [[]]
    for style, text in pieces:
        for j, chunk in enumerate(text.split("\n")):
            if j:
                lines[-1].append(("bos", "↵"))
                lines.append([])
            if chunk:
                lines[-1].append((style, chunk))
    # a note goes after everything else on its line (after the newline mark too): it is not prompt text
    lines = [[p for p in line if p[0] != "note"] + [p for p in line if p[0] == "note"] for line in lines]
    return [line for line in lines if line] or [[]]


def tspans(line: list[tuple[str, str]]) -> str:
    out = []
    for style, text in line:
        attrs = f'fill="{COLORS[style]}"'
        if style == "control":
            attrs += ' font-weight="bold"'
        if style in ("bos", "note"):
            attrs += ' font-style="italic"'
        out.append(f"<tspan {attrs}>{escape(text)}</tspan>")
    return "".join(out)


def svg() -> str:
    families = [(spec.display_name, spec.family) for spec in MODELS.values()]
    body, y = [], TOP
    for display_name, family in families:
        fmt = get_chat_format(family)
        lines = styled_lines(family)
        height = 34 + LINE * len(lines) + 26
        body.append(f'  <rect x="16" y="{y}" width="{WIDTH - 32}" height="{height}" rx="8" fill="#f7f9fc" '
                    'stroke="#b8c4d6"/>')
        body.append(f'  <text x="30" y="{y + 22}" class="label">{escape(display_name)}</text>')
        body.append(f'  <text x="250" y="{y + 22}" class="note">{escape(SYSTEM[family])}</text>')
        for i, line in enumerate(lines):
            body.append(f'  <text x="30" y="{y + 44 + LINE * i}" class="mono" xml:space="preserve">'
                        f"{tspans(line)}</text>")
        stops = "  ".join(fmt.stop_tokens + tuple(f"“{s}”（文字）" for s in fmt.stop_strings
                                                  if s not in fmt.stop_tokens))
        body.append(f'  <text x="30" y="{y + height - 12}" class="note">停止：'
                    f'<tspan class="mono" fill="{COLORS["control"]}">{escape(stops)}</tspan></text>')
        y += height + 12
    legend_y = y + 8
    legend = (f'  <text x="30" y="{legend_y}" class="note">'
              f'<tspan fill="{COLORS["control"]}" font-weight="bold">橙色粗体</tspan>：控制 token（一个专门的 id）　'
              f'<tspan fill="{COLORS["plain-marker"]}">蓝色</tspan>：当作标记用的普通文字　'
              f'<tspan fill="{COLORS["bos"]}" font-style="italic">&lt;s&gt;</tspan>：分词器加的 BOS　'
              f'<tspan fill="{COLORS["bos"]}" font-style="italic">↵</tspan>：换行</text>')
    total = legend_y + 22
    head = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total}" viewBox="0 0 {WIDTH} {total}" role="img" aria-labelledby="title desc">
  <title id="title">同一段对话在五个模型里的提示词格式</title>
  <desc id="desc">同一段两轮对话（你好 / 你好！ / 讲个笑话）按 Qwen、XVERSE、BlueLM、InternLM2、MiniCPM 各自的格式拼成的提示词，控制 token、普通文字标记、BOS 和换行用不同颜色标出，并列出每个模型的停止 token。由 scripts/chat_formats_figure.py 从 helpers/formats.py 生成。</desc>
  <style>
    text {{ font-family: 'Noto Sans CJK SC', 'Source Han Sans SC', 'PingFang SC', 'Microsoft YaHei', sans-serif; fill: #222; }}
    .mono {{ font-family: 'Noto Sans Mono CJK SC', 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 14px; }}
    .title {{ font-size: 20px; font-weight: bold; }}
    .label {{ font-size: 15px; font-weight: bold; }}
    .note {{ font-size: 13px; fill: #555; }}
  </style>
  <rect x="0" y="0" width="{WIDTH}" height="{total}" fill="#ffffff"/>
  <text x="24" y="34" class="title">同一段对话，五种提示词格式</text>
  <text x="300" y="34" class="note">用户：你好 → 助手：你好！ → 用户：讲个笑话（提示词以模型开始回答的位置结尾）</text>
"""
    return head + "\n".join(body) + "\n" + legend + "\n</svg>\n"


def main() -> int:
    OUT.write_text(svg(), encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
