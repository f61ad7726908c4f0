// A small Markdown renderer that is safe by construction: it builds DOM nodes with createElement and
// textContent only, never innerHTML, so model output can never become markup or script. Supported: fenced code
// blocks (with a copy button), headings, bullet and numbered lists, tables, block quotes, paragraphs, and inline
// `code`, **bold**, *emphasis* and [links](http://...) (http, https and mailto only).
"use strict";

const TokenwireMarkdown = (() => {
  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function safeHref(url) {
    try {
      const u = new URL(url, "https://invalid.example/");
      return ["http:", "https:", "mailto:"].includes(u.protocol) && !url.startsWith("//") && /^[a-z]+:/i.test(url)
        ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  // Inline spans: code first (its content is literal), then links, bold, emphasis.
  // Underscores only emphasise at word boundaries (as in CommonMark), so snake_case and __dunder__ stay as typed.
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^)\s]+)\)|\*\*([^*\n]+)\*\*|(?<![\w])__([^_\n]+)__(?![\w])|\*([^*\n]+)\*|(?<![\w])_([^_\n]+)_(?![\w])/;

  function inline(parent, text) {
    while (text) {
      const m = INLINE.exec(text);
      if (!m) { parent.appendChild(document.createTextNode(text)); return; }
      if (m.index > 0) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
      if (m[1]) parent.appendChild(el("code", m[2]));
      else if (m[3] !== undefined) {
        const href = safeHref(m[4]);
        if (href) {
          const a = el("a");
          a.href = href; a.rel = "noopener noreferrer nofollow"; a.target = "_blank";
          inline(a, m[3]);
          parent.appendChild(a);
        } else {
          parent.appendChild(document.createTextNode(m[0]));  // not a safe link: shown as typed
        }
      } else if (m[5] !== undefined || m[6] !== undefined) {
        const b = el("strong"); inline(b, m[5] ?? m[6]); parent.appendChild(b);
      } else {
        const i = el("em"); inline(i, m[7] ?? m[8]); parent.appendChild(i);
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  const isTableSep = (line) => /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(line);
  const LIST = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/;

  function codeBlock(lang, code) {
    const pre = el("pre");
    const c = el("code", code);
    if (lang) c.dataset.lang = lang;
    const copy = el("button", "Copy");
    copy.type = "button"; copy.className = "copy"; copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => {
      const show = (label) => { copy.textContent = label; setTimeout(() => { copy.textContent = "Copy"; }, 1500); };
      // The Clipboard API exists only in secure contexts (https, localhost); a page opened as http://host:port
      // falls back to copying a selection, and failing that leaves the code selected for Ctrl+C.
      const fallback = () => {
        const area = el("textarea");
        area.value = code;
        area.setAttribute("readonly", "");
        area.style.position = "fixed"; area.style.opacity = "0";
        document.body.appendChild(area);
        area.select();
        let ok = false;
        try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
        area.remove();
        if (ok) { show("Copied"); return; }
        const range = document.createRange();
        range.selectNodeContents(c);
        const sel = window.getSelection();
        sel.removeAllRanges(); sel.addRange(range);
        show("Press Ctrl+C");
      };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(code).then(() => show("Copied"), fallback);
      else fallback();
    });
    pre.append(copy, c);
    return pre;
  }

  // Renders ``text`` into a fresh DocumentFragment.
  function render(text) {
    const out = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = /^\s*(```+|~~~+)\s*([\w+-]*)\s*$/.exec(line);
      if (fence) {  // fenced code; an unclosed fence (still streaming) runs to the end
        const close = fence[1];
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(close)) body.push(lines[i++]);
        i++;
        out.appendChild(codeBlock(fence[2], body.join("\n")));
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      if (heading) {
        const h = el(`h${Math.min(6, heading[1].length + 2)}`);
        inline(h, heading[2]);
        out.appendChild(h); i++; continue;
      }
      if (line.includes("|") && i + 1 < lines.length && isTableSep(lines[i + 1])) {
        const table = el("table");
        const head = el("thead"); const hr = el("tr");
        for (const cell of splitRow(line)) { const th = el("th"); inline(th, cell); hr.appendChild(th); }
        head.appendChild(hr); table.appendChild(head);
        const body = el("tbody");
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const tr = el("tr");
          for (const cell of splitRow(lines[i])) { const td = el("td"); inline(td, cell); tr.appendChild(td); }
          body.appendChild(tr); i++;
        }
        table.appendChild(body); out.appendChild(table);
        continue;
      }
      if (/^\s*>/.test(line)) {
        const quote = el("blockquote");
        const inner = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) inner.push(lines[i++].replace(/^\s*>\s?/, ""));
        quote.appendChild(render(inner.join("\n")));
        out.appendChild(quote);
        continue;
      }
      const item = LIST.exec(line);
      if (item) {
        const ordered = /\d/.test(item[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered) list.start = parseInt(item[2], 10);
        while (i < lines.length) {
          const m = LIST.exec(lines[i]);
          if (!m || /\d/.test(m[2]) !== ordered) break;
          const li = el("li"); inline(li, m[3]); list.appendChild(li); i++;
          while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !LIST.exec(lines[i])) {
            li.appendChild(document.createTextNode(" ")); inline(li, lines[i++].trim());
          }
        }
        out.appendChild(list);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>)/.test(lines[i]) && !LIST.exec(lines[i])
             && !(lines[i].includes("|") && i + 1 < lines.length && isTableSep(lines[i + 1]))) {
        para.push(lines[i++]);
      }
      const p = el("p");
      para.forEach((t, k) => { if (k) p.appendChild(el("br")); inline(p, t); });
      out.appendChild(p);
    }
    return out;
  }

  return { render };
})();
