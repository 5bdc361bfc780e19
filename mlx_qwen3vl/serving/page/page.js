// The chat page of server.py: plain JavaScript, run as it is. It talks to its own server only: the
// OpenAI API (/v1/models, /v1/chat/completions streamed) and /v1/media (what an image or video becomes,
// read by the package's own processor). Boxes and points come parsed from the server (`detections`);
// the page only scales them to the image as shown.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "mlx-qwen3vl.chats"; // conversations: localStorage
const KEY = "mlx-qwen3vl.api-key"; // the API key: sessionStorage (this tab only)
// A colour per label (Trubetskoy's distinct colours, as grounding.draw uses), with the text colour that
// reads on it.
const COLOURS = [
  ["#e6194b", "#fff"], ["#3cb44b", "#000"], ["#ffe119", "#000"], ["#4363d8", "#fff"],
  ["#f58231", "#000"], ["#911eb4", "#fff"], ["#46f0f0", "#000"], ["#f032e6", "#000"],
];

const state = {
  model: "",
  chats: readChats(), // {list: [{id, title, messages}], current}
  attachments: [], // {kind, url, name, bytes, info: {description, tokens} | null, error}
  running: null, // the AbortController of the answer being streamed
  pinned: true, // the conversation is scrolled to its end, and follows what is added there
};

// ---- the server ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const out = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function api(path, body, signal) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error.message;
  } catch (_) {
    // not OpenAI's error shape: the status says it
  }
  if (response.status === 401) askForKey();
  throw new ApiError(response.status, message);
}

function askForKey() {
  const wrong = Boolean(sessionStorage.getItem(KEY));
  sessionStorage.removeItem(KEY);
  notify(wrong ? "The server refused this API key: enter the key server.py was started with (--api-key)."
    : "This server needs its API key (server.py --api-key): enter it below.");
  $("key-form").hidden = false;
  $("key").focus();
}

async function connect() {
  try {
    const models = await (await api("/v1/models")).json();
    state.model = models.data[0].id;
    $("model").textContent = state.model;
    document.title = `${state.model} · mlx-qwen3vl`;
    $("key-form").hidden = true;
    notify("");
  } catch (e) {
    if (e.status !== 401) notify(`Cannot reach the server: ${e.message}`);
  }
}

function notify(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// ---- conversations in localStorage ----------------------------------------------------------------------

function readChats() {
  try {
    const chats = JSON.parse(localStorage.getItem(STORE));
    if (chats && Array.isArray(chats.list) && chats.list.length) return chats;
  } catch (_) {
    // unreadable: start afresh
  }
  const chat = newChat();
  return { list: [chat], current: chat.id };
}

function newChat() {
  return { id: `${Date.now()}-${Math.random().toString(36).slice(2)}`, title: "New chat", messages: [] };
}

function currentChat() {
  return state.chats.list.find((c) => c.id === state.chats.current) || state.chats.list[0];
}

function saveChats() {
  // Images are kept as data: URLs, so a few photos can fill the browser's quota: the oldest other
  // conversations go first, and if this one alone is too large it is kept until the page closes.
  for (;;) {
    try {
      localStorage.setItem(STORE, JSON.stringify(state.chats));
      return;
    } catch (_) {
      const others = state.chats.list.filter((c) => c.id !== state.chats.current);
      if (!others.length) {
        notify("This conversation is too large to keep in the browser: it will not survive a reload.");
        return;
      }
      state.chats.list.splice(state.chats.list.indexOf(others[0]), 1);
    }
  }
}

function showChats() {
  const select = $("chats");
  select.replaceChildren(...state.chats.list.map((c) => new Option(c.title, c.id, false, c.id === state.chats.current)));
  const conversation = $("conversation");
  conversation.replaceChildren();
  for (const message of currentChat().messages) conversation.append(messageView(message, currentChat()));
  state.pinned = true;
  follow();
}

function follow() {
  const conversation = $("conversation");
  if (state.pinned) conversation.scrollTop = conversation.scrollHeight;
}

// ---- messages -----------------------------------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function messageView(message, chat) {
  const view = element("article", `message ${message.role}`);
  if (message.role === "user") {
    if (message.media.length) view.append(thumbnails(message.media));
    view.append(element("div", "content", message.text));
    return view;
  }
  const reasoning = element("details", "reasoning");
  reasoning.append(element("summary", "", "Reasoning"), element("div", "text", message.reasoning));
  reasoning.hidden = !message.reasoning;
  const content = element("div", "content", message.content);
  const calls = element("div", "tool-calls");
  const stats = element("footer", "stats", message.stats || "");
  view.append(reasoning, content, calls, stats);
  view.parts = { reasoning, content, calls, stats };
  for (const call of message.tool_calls) calls.append(toolCallView(call));
  if (message.detections.length) view.insertBefore(groundingView(message.detections, chat, message), stats);
  return view;
}

function toolCallView(call) {
  return element("div", "tool-call", `Tool call: ${call.function.name}(${call.function.arguments})`);
}

function thumbnails(media, removable) {
  const list = element("ul", "thumbs");
  media.forEach((item, i) => {
    const entry = element("li");
    const preview = element(item.kind === "image" ? "img" : "video");
    preview.src = item.url;
    preview.alt = item.name;
    if (item.kind === "video") Object.assign(preview, { muted: true, preload: "metadata", controls: true });
    const info = element("div", "media-info", mediaInfo(item));
    entry.append(preview, info);
    if (removable) {
      const remove = element("button", "remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove ${item.name}`);
      remove.addEventListener("click", () => {
        state.attachments.splice(i, 1);
        showAttachments();
      });
      entry.append(remove);
    }
    list.append(entry);
  });
  return list;
}

function mediaInfo(item) {
  const size = item.bytes >= 1e6 ? `${(item.bytes / 1e6).toFixed(1)} MB` : `${Math.ceil(item.bytes / 1e3)} kB`;
  const became = item.error ? item.error : item.info ? item.info.description : "reading…";
  return `${item.name}, ${size}: ${became}`;
}

// ---- attachments ----------------------------------------------------------------------------------------

function mediaOptions(kind) {
  const out = {};
  const maxPixels = $("max-pixels").valueAsNumber;
  const fps = $("fps").valueAsNumber;
  if (maxPixels > 0) out.max_pixels = maxPixels;
  if (kind === "video" && fps > 0) out.fps = fps;
  return out;
}

function mediaPart(item, options) {
  const type = `${item.kind}_url`;
  return { type, [type]: { url: item.url }, ...options };
}

function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
    if (!kind) {
      notify(`${file.name} is neither an image nor a video.`);
      continue;
    }
    const item = { kind, url: "", name: file.name || `pasted ${kind}`, bytes: file.size, info: null, error: "" };
    state.attachments.push(item);
    item.ready = new Promise((resolve) => {
      const reader = new FileReader();
      reader.onload = () => {
        item.url = reader.result;
        showAttachments();
        inspect(item).then(resolve);
      };
      reader.readAsDataURL(file);
    });
  }
  showAttachments();
}

async function inspect(item) {
  // What the server's processor makes of it with the options as they are now: its size and tokens.
  item.options = mediaOptions(item.kind);
  try {
    item.info = await (await api("/v1/media", mediaPart(item, item.options))).json();
    item.error = "";
  } catch (e) {
    item.info = null;
    item.error = e.message;
  }
  showAttachments();
}

function showAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  if (state.attachments.length) {
    const total = state.attachments.reduce((sum, item) => sum + (item.info ? item.info.tokens : 0), 0);
    list.replaceChildren(...thumbnails(state.attachments, true).children);
    list.title = `${total.toLocaleString()} tokens in all`;
  }
}

// ---- an answer, streamed --------------------------------------------------------------------------------

function apiMessages(messages) {
  // An answer that failed before its first word is left out: the question stands alone.
  const said = messages.filter((m) => m.role === "user" || m.content || m.tool_calls.length);
  return said.map((m) => {
    if (m.role === "user") {
      const parts = m.media.map((item) => mediaPart(item, item.options || {}));
      return { role: "user", content: [...parts, { type: "text", text: m.text }] };
    }
    const out = { role: "assistant", content: m.content };
    if (m.tool_calls.length) out.tool_calls = m.tool_calls;
    return out;
  });
}

async function send() {
  const text = $("prompt").value.trim();
  if (state.running || (!text && !state.attachments.length)) return;
  if (!$("key-form").hidden) return $("key").focus();
  let tools;
  try {
    tools = $("tools").value.trim() ? JSON.parse($("tools").value) : undefined;
  } catch (e) {
    return notify(`The tools are not valid JSON: ${e.message}`);
  }
  await Promise.all(state.attachments.map((item) => item.ready));
  const chat = currentChat();
  const media = state.attachments.map(({ kind, url, name, bytes, info, options }) => ({ kind, url, name, bytes, info, options }));
  chat.messages.push({ role: "user", text, media });
  if (chat.title === "New chat") chat.title = (text || media[0].name).slice(0, 40);
  const answer = { role: "assistant", content: "", reasoning: "", tool_calls: [], detections: [], stats: "" };
  chat.messages.push(answer);
  state.attachments = [];
  $("prompt").value = "";
  showAttachments();
  showChats();
  notify("");
  const view = $("conversation").lastElementChild;
  const request = {
    model: state.model || "default",
    messages: apiMessages(chat.messages.slice(0, -1)),
    stream: true,
    stream_options: { include_usage: true },
    ...(tools ? { tools } : {}),
  };
  setRunning(true);
  try {
    await stream(request, answer, view);
  } catch (e) {
    if (e.name === "AbortError") answer.stats = `stopped${answer.stats ? `, ${answer.stats}` : ""}`;
    else {
      answer.stats = "failed";
      notify(e.message);
    }
  } finally {
    setRunning(false);
    view.parts.stats.textContent = answer.stats;
    if (answer.detections.length) view.insertBefore(groundingView(answer.detections, chat, answer), view.parts.stats);
    follow();
    saveChats();
  }
}

function setRunning(on) {
  state.running = on ? new AbortController() : null;
  $("send").hidden = on;
  $("stop").hidden = !on;
}

async function stream(request, answer, view) {
  const response = await api("/v1/chat/completions", request, state.running.signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const reasoning = view.parts.reasoning.lastChild.appendChild(document.createTextNode(""));
  const content = view.parts.content.appendChild(document.createTextNode(""));
  let buffer = "";
  let first = 0; // when the first piece came: the speed is that of decoding, after the prompt
  const started = performance.now();
  const shown = () => {
    first = first || performance.now();
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      if (chunk.usage) {
        const tokens = chunk.usage.completion_tokens;
        const seconds = (performance.now() - (first || started)) / 1000;
        const speed = tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : 0;
        answer.stats = `${tokens} tokens${speed ? `, ${speed.toFixed(1)} tokens/s` : ""}`;
        $("speed").textContent = speed ? `${speed.toFixed(1)} tokens/s` : "";
      }
      for (const { delta } of chunk.choices) {
        if (delta.reasoning_content) {
          view.parts.reasoning.hidden = false;
          reasoning.appendData(delta.reasoning_content);
          answer.reasoning += delta.reasoning_content;
          shown();
        }
        if (delta.content) {
          content.appendData(delta.content);
          answer.content += delta.content;
          shown();
        }
        for (const call of delta.tool_calls || []) {
          const { index, ...entry } = call;
          answer.tool_calls.push(entry);
          view.parts.calls.append(toolCallView(entry));
        }
        if (delta.detections) answer.detections = delta.detections;
      }
      view.parts.stats.textContent = answer.stats;
      follow();
    }
  }
}

function stop() {
  if (state.running) state.running.abort();
}

// ---- grounding -------------------------------------------------------------------------------------------

function groundingView(detections, chat, answer) {
  // The image the detections are on: the request's image of that index, counted over the messages sent.
  const sent = chat.messages.slice(0, chat.messages.indexOf(answer));
  const images = sent.flatMap((m) => (m.role === "user" ? m.media.filter((item) => item.kind === "image") : []));
  const image = images[detections[0].image];
  const figure = element("figure", "grounding");
  if (!image) return figure;
  const frame = element("div", "frame");
  const picture = element("img");
  picture.alt = `${image.name} with what the answer locates`;
  frame.append(picture);
  const colours = new Map();
  const marks = detections.map((d, i) => {
    if (!colours.has(d.label)) colours.set(d.label, COLOURS[colours.size % COLOURS.length]);
    const mark = element("div", `mark ${d.box ? "box" : "point"}`);
    const tag = element("span", "tag", d.label || (d.box ? "box" : "point"));
    for (const node of [mark, tag]) {
      node.style.setProperty("--c", colours.get(d.label)[0]);
      node.style.setProperty("--t", colours.get(d.label)[1]);
      node.dataset.index = i;
      node.addEventListener("mouseenter", () => highlight(frame, i));
      node.addEventListener("mouseleave", () => highlight(frame, -1));
    }
    frame.append(mark, tag);
    return { d, mark, tag };
  });
  const place = () => {
    // Pixels of the original image (as the model read it) to pixels of the image as shown.
    const { size } = detections[0];
    const sx = picture.clientWidth / size[0];
    const sy = picture.clientHeight / size[1];
    for (const { d, mark, tag } of marks) {
      const [x, y] = d.box ? [d.box[0] * sx, d.box[1] * sy] : [d.point[0] * sx, d.point[1] * sy];
      Object.assign(mark.style, { left: `${x}px`, top: `${y}px` });
      if (d.box) Object.assign(mark.style, { width: `${(d.box[2] - d.box[0]) * sx}px`, height: `${(d.box[3] - d.box[1]) * sy}px` });
      Object.assign(tag.style, { left: `${x + (d.box ? 0 : 8)}px`, top: `${y - (d.box ? 0 : 8)}px` });
    }
  };
  picture.addEventListener("load", place);
  new ResizeObserver(place).observe(picture);
  picture.src = image.url;
  const caption = element("figcaption", "", describe(detections));
  const download = element("button", "", "Download");
  download.type = "button";
  download.addEventListener("click", () => downloadDrawing(picture, marks, colours));
  caption.append(download);
  figure.append(frame, caption);
  return figure;
}

function highlight(frame, index) {
  frame.classList.toggle("hovering", index >= 0);
  for (const node of frame.querySelectorAll(".mark, .tag")) node.classList.toggle("hot", Number(node.dataset.index) === index);
}

function describe(detections) {
  const boxes = detections.filter((d) => d.box).length;
  const points = detections.filter((d) => d.point).length;
  const count = (n, one, many) => (n ? [`${n} ${n === 1 ? one : many}`] : []);
  return [...count(boxes, "box", "boxes"), ...count(points, "point", "points")].join(" and ");
}

function downloadDrawing(picture, marks, colours) {
  // The image at its own size with the marks drawn in, as a PNG.
  const canvas = element("canvas");
  canvas.width = picture.naturalWidth;
  canvas.height = picture.naturalHeight;
  const pen = canvas.getContext("2d");
  pen.drawImage(picture, 0, 0);
  const { size } = marks[0].d;
  const s = canvas.width / size[0];
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 250));
  pen.lineWidth = line;
  pen.font = `${Math.max(12, Math.round(Math.min(canvas.width, canvas.height) / 40))}px system-ui, sans-serif`;
  pen.textBaseline = "bottom";
  for (const { d } of marks) {
    const [colour, ink] = colours.get(d.label);
    pen.strokeStyle = pen.fillStyle = colour;
    let [x, y] = d.box || d.point;
    [x, y] = [x * s, y * s];
    if (d.box) pen.strokeRect(x, y, (d.box[2] - d.box[0]) * s, (d.box[3] - d.box[1]) * s);
    else {
      pen.beginPath();
      pen.arc(x, y, 3 * line, 0, 2 * Math.PI);
      pen.fill();
    }
    if (d.label) {
      const width = pen.measureText(d.label).width + 2 * line;
      const height = parseInt(pen.font, 10) * 1.3;
      pen.fillRect(x, y - height, width, height);
      pen.fillStyle = ink;
      pen.fillText(d.label, x + line, y);
    }
  }
  canvas.toBlob((blob) => {
    const link = element("a");
    link.href = URL.createObjectURL(blob);
    link.download = "grounding.png";
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }, "image/png");
}

// ---- wiring ---------------------------------------------------------------------------------------------

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("stop").addEventListener("click", stop);
  const conversation = $("conversation");
  conversation.addEventListener("scroll", () => {
    state.pinned = conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 40;
  });
  conversation.addEventListener("load", follow, true); // images and videos change the height as they load
  window.addEventListener("resize", follow);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stop();
  });
  $("files").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  document.addEventListener("paste", (e) => {
    if (e.clipboardData.files.length) {
      e.preventDefault();
      addFiles(e.clipboardData.files);
    }
  });
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dropping");
  });
  document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dropping");
    addFiles(e.dataTransfer.files);
  });
  for (const id of ["max-pixels", "fps"]) {
    $(id).addEventListener("change", () => state.attachments.forEach((item) => (item.ready = item.ready.then(() => inspect(item)))));
  }
  $("new-chat").addEventListener("click", () => {
    const chat = currentChat();
    if (chat.messages.length) {
      const fresh = newChat();
      state.chats.list.unshift(fresh);
      state.chats.current = fresh.id;
    }
    saveChats();
    showChats();
    $("prompt").focus();
  });
  $("chats").addEventListener("change", (e) => {
    state.chats.current = e.target.value;
    saveChats();
    showChats();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    connect();
  });
}

wire();
showChats();
connect();
