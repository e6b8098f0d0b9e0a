// Stylecast studio: webcam → GPU worker → styled canvas, speaking the protocol in docs/protocol.md.
//
// Hot-path rules: frames are captured with the async canvas.toBlob (never toDataURL), never faster than the
// camera delivers them (at most MAX_CAPTURE_FPS a second), and at most MAX_UNACKED frames are on the wire
// unacknowledged at any time (the worker acks a frame as soon as it waits for the GPU, keeping one per
// session: no queue can grow). When the worker's `ready` says `pace`, the Pacer times each capture to reach
// the worker just before the GPU is free for this session (one frame per turn, hardly any wait); otherwise
// frames go at camera rate and the GPU finds one at most a camera interval old. Output frames are decoded
// with createImageBitmap and drawn in requestAnimationFrame, and the HUD updates a few text nodes a few
// times a second — nothing per frame touches the DOM.

import { holdNavigation, refreshSession } from "/static/session.js";

// The worker's wire contract, as inference/protocol.py defines it (tests/studio/test_studio_constants.py
// holds these to it): frame size, flow control, limits, the frame header's layout and the close codes.
const SIZE = 512;
const MAX_UNACKED = 2;
const MAX_CAPTURE_FPS = 60; // and never more than the camera produces
const MAX_PROMPT_CHARS = 500;
const MAX_SEED = 0xffffffff;
const MAX_FRAME_ID = 0xffffffff;
// Little-endian: uint32 frame id at 0, uint16 render ms at 4, int16 waited ms at 6, then the JPEG.
const HEADER_BYTES = 8;
const HEADER_FRAME_ID_AT = 0;
const HEADER_WAITED_MS_AT = 6;
// In the client's binary messages the uint16 at 4 says what they carry: 0 a frame, 1 the style image.
const HEADER_KIND_AT = 4;
const KIND_STYLE_IMAGE = 1;
const MAX_STYLE_IMAGE_BYTES = 2097088;
const CLOSE_BAD_TICKET = 4401;
const CLOSE_ALLOWANCE_USED = 4402;
const CLOSE_IDLE = 4410;
const CLOSE_WORKER_FULL = 4503;
const CLOSE_NORMAL = 1000;

// The studio's own choices.
const DEFAULT_CAMERA_FPS = 30; // when the browser does not say how fast the camera runs
// An unpaced capture may start this much before a camera interval after the last one: a timer or display
// frame that fires a little late does not cost the next frame its slot (captures still average no more than
// the camera's rate, since each slot is a camera interval after the one before).
const CAPTURE_SLACK_MS = 4;
const JPEG_QUALITY = 0.8;
const PARAMS_DEBOUNCE_MS = 250;
const STALE_FRAME_MS = 4000; // an unacknowledged frame older than this no longer counts (a lost ack)
// Style images: what the picker accepts, and the square the browser scales them to before sending (the
// worker reads a style image at 512² whatever its size, so a larger one would only cost upload time).
const STYLE_FILE_MAX_BYTES = 8 * 1024 * 1024;
const STYLE_FILE_TYPES = ["image/jpeg", "image/png", "image/webp"];
const STYLE_SEND_SIDE = 512;
const STYLE_SEND_QUALITY = 0.9;

// When to send the next frame: one per service interval (the worker's round, which each `ack` says),
// timed by how long the last rendered frame waited for the engine (the worker says so in the output's
// header). The algorithm and its parameters are inference/pacing.py's (the reasoning is there and in docs/protocol.md; the same test holds the
// parameters to it, in milliseconds where pacing.py has seconds). Times in milliseconds of
// performance.now().
const PACING = {
  intervalSmoothing: 0.25,
  waitSmoothing: 0.2,
  gain: 0.5,
  gainNothingInFlight: 0.9,
  minMarginMs: 4,
  maxMarginMs: 20,
  jitterMargins: 2,
  settlingOutputs: 3,
  settlingTimeoutMs: 1000,
  maxGapMs: 2000,
};

class Pacer {
  constructor(cameraFps) {
    this.cameraInterval = 1000 / cameraFps;
    this.round = 0; // the worker's round, from its latest ack (0: not said)
    this.measured = this.cameraInterval; // the time between outputs, less the engine's idle time
    this.wait = 0;
    this.jitter = 0;
    this.correction = 0;
    this.outputs = 0;
    this.lastSentId = 0;
    this.lastSentAt = -Infinity;
    this.cameraDue = -Infinity;
    this.lastOutputId = 0;
    this.lastOutputAt = null;
    this.gaps = 0;
    this.waits = 0;
  }

  // The worker's round, or until it says one the time between outputs; never below the camera's interval.
  get interval() {
    return this.round > 0 ? Math.max(this.cameraInterval, this.round) : this.measured;
  }

  get margin() {
    const wanted = Math.max(PACING.minMarginMs, PACING.jitterMargins * this.jitter);
    return Math.min(wanted, PACING.maxMarginMs, this.interval / 4);
  }

  rendered(frameId, waited, at) {
    this.outputs += 1;
    this.lastOutputId = Math.max(this.lastOutputId, frameId);
    if (this.lastOutputAt !== null && at - this.lastOutputAt <= PACING.maxGapMs) {
      this.gaps += 1;
      const share = Math.max(PACING.intervalSmoothing, 1 / this.gaps);
      const gap = at - this.lastOutputAt - Math.max(0, -waited); // the engine's idle time is not the turn's
      this.measured = Math.max(this.cameraInterval, this.measured + share * (gap - this.measured));
    }
    this.lastOutputAt = at;
    if (this.outputs > PACING.settlingOutputs && Math.abs(waited - this.margin) <= PACING.maxMarginMs) {
      if (this.waits) {
        this.jitter += PACING.waitSmoothing * (Math.abs(waited - this.wait) - this.jitter);
        this.wait += PACING.waitSmoothing * (waited - this.wait);
      } else {
        this.wait = waited;
      }
      this.waits += 1;
    }
    const gain = this.lastSentId > frameId ? PACING.gain : PACING.gainNothingInFlight;
    const limit = this.interval / 2;
    this.correction = Math.min(Math.max(gain * (waited - this.margin), -limit), limit);
  }

  acknowledged(roundMs) {
    this.round = roundMs;
  }

  due() {
    if (this.outputs < PACING.settlingOutputs) {
      if (this.lastSentId > this.lastOutputId) return this.lastSentAt + PACING.settlingTimeoutMs;
      return this.cameraDue;
    }
    return Math.max(this.cameraDue, this.lastSentAt + this.interval + this.correction);
  }

  sent(frameId, at) {
    this.lastSentId = frameId;
    this.lastSentAt = at;
    const tick = Number.isFinite(this.cameraDue) ? Math.max(this.cameraDue, at - this.cameraInterval / 2) : at;
    this.cameraDue = tick + this.cameraInterval;
    this.correction = 0;
  }
}

const $ = (id) => document.getElementById(id);
const root = $("studio");
const output = $("output");
const outputContext = output.getContext("2d", { alpha: false });
const camera = $("camera");
const capture = document.createElement("canvas");
capture.width = SIZE;
capture.height = SIZE;
const captureContext = capture.getContext("2d", { alpha: false, willReadFrequently: false });
const csrfToken = document.querySelector('meta[name="csrf-token"]').content;

const ui = {
  start: $("start"),
  stop: $("stop"),
  snapshot: $("snapshot"),
  record: $("record"),
  prompt: $("prompt"),
  steps: $("steps"),
  seed: $("seed"),
  reseed: $("reseed"),
  mode: $("mode"),
  modeField: $("mode-field"),
  modeHelp: $("mode-help"),
  modeLabel: $("mode-label"),
  status: $("status"),
  statusDot: $("status-dot"),
  fps: $("fps"),
  latency: $("latency"),
  engine: $("engine-label"),
  rec: $("rec-indicator"),
  empty: $("stage-empty"),
  countdown: $("countdown"),
  paywall: $("paywall"),
  stage: document.querySelector(".stage-frame"),
  styleInput: $("style-image-input"),
  styleActive: $("style-image-active"),
  styleThumb: $("style-image-thumb"),
  styleRemove: $("style-image-remove"),
  styleMessage: $("style-image-help"),
  presets: [...document.querySelectorAll(".preset")],
  adapterScale: $("adapter-scale"),
  adapterScaleField: $("adapter-scale-field"),
  adapterScaleValue: $("adapter-scale-value"),
};

const STATUS_TEXT = {
  idle: "Ready when you are.",
  camera: "Waiting for your camera…",
  connecting: "Starting a GPU — not billed…",
  warming: "Warming up the GPU (cold start, not billed)…",
  busy: "All GPUs are busy — retrying…",
  paused: "Paused — press Start to go on.",
  streaming: "Streaming",
  reconnecting: "Connection lost — reconnecting…",
  "out-of-minutes": "You're out of minutes.",
  error: "Something went wrong.",
};

const session = {
  wanted: false, // the user pressed Start and not Stop
  socket: null,
  ready: false,
  stream: null,
  nextFrameId: 1,
  unacked: new Map(), // frame id -> performance.now() when sent, until the worker acks it (or refuses it)
  sentAt: new Map(), // frame id -> performance.now() when sent, until its output (or a newer one) arrives
  modes: [], // the engine's render modes, from `ready`; the first is the default
  adapters: [], // the LoRA adapters the worker serves, from `ready` (name, scale, trigger)
  adapter: null, // the adapter the chosen preset names, while the worker serves it; null: none
  captureDue: 0, // unpaced: when the next capture may start (a camera interval after the last one's slot)
  capturing: false,
  pace: false, // the worker's `ready` asked for paced frames
  cameraFps: DEFAULT_CAMERA_FPS, // the camera's frame rate, as its track reports it
  pacer: new Pacer(DEFAULT_CAMERA_FPS), // a new one per connection, at the camera's rate (forgetFrames)
  captureTimer: 0,
  reconnectAttempt: 0,
  reconnectTimer: 0,
  pendingBitmap: null,
  delivered: [], // timestamps of delivered frames within the last second
  lastLatency: null,
  hasOutput: false,
  secondsRemaining: null,
  usageAt: 0,
  recorder: null,
  // The chosen style image as sent to the worker (header and bytes), kept across reconnects; null: none.
  styleMessage: null,
  styleThumbUrl: null,
};

// ---------------------------------------------------------------- status and HUD

function setStatus(state, detail) {
  ui.status.dataset.state = state;
  ui.statusDot.dataset.state = state;
  ui.status.textContent = detail ? `${STATUS_TEXT[state]} ${detail}` : STATUS_TEXT[state];
  root.dataset.state = state;
}

function updateControls() {
  const running = session.wanted;
  ui.start.disabled = running;
  ui.stop.disabled = !running;
  ui.snapshot.disabled = !session.hasOutput;
  ui.record.disabled = !session.hasOutput && !session.recorder;
}

setInterval(() => {
  const now = performance.now();
  while (session.delivered.length && now - session.delivered[0] > 1000) session.delivered.shift();
  ui.fps.textContent = session.delivered.length.toFixed(1);
  ui.latency.textContent = session.lastLatency === null ? "–" : String(Math.round(session.lastLatency));
  if (session.secondsRemaining !== null) {
    // Smooth local countdown between the worker's usage messages; the worker's count is the truth.
    const flowing = session.ready && session.delivered.length > 0;
    const elapsed = flowing ? (now - session.usageAt) / 1000 : 0;
    const left = Math.max(0, session.secondsRemaining - Math.min(elapsed, 1.5));
    ui.countdown.hidden = false;
    ui.countdown.textContent = `${formatClock(left)} left`;
  }
}, 250);

function formatClock(seconds) {
  const whole = Math.ceil(seconds);
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

// ---------------------------------------------------------------- camera

async function openCamera() {
  if (session.stream) return session.stream;
  setStatus("camera");
  // A camera that can run faster than 30 frames a second is asked to: a mode that renders faster than
  // that shows its rate only to a camera that keeps up. Resolution still weighs as much in the browser's
  // choice, so a camera fast only at a small size stays at the larger one.
  const stream = await navigator.mediaDevices.getUserMedia({
    video: {
      width: { ideal: SIZE },
      height: { ideal: SIZE },
      frameRate: { ideal: MAX_CAPTURE_FPS },
      facingMode: "user",
    },
    audio: false,
  });
  const reported = stream.getVideoTracks()[0]?.getSettings().frameRate;
  session.cameraFps = Math.min(MAX_CAPTURE_FPS, reported > 0 ? reported : DEFAULT_CAMERA_FPS);
  session.stream = stream;
  camera.srcObject = stream;
  camera.dataset.live = "";
  await camera.play();
  return stream;
}

function closeCamera() {
  session.stream?.getTracks().forEach((track) => track.stop());
  session.stream = null;
  camera.srcObject = null;
  delete camera.dataset.live;
}

// Center-crop whatever the camera gives to a square and scale it to SIZE².
function drawCameraSquare() {
  const width = camera.videoWidth;
  const height = camera.videoHeight;
  if (!width || !height) return false;
  const side = Math.min(width, height);
  captureContext.drawImage(camera, (width - side) / 2, (height - side) / 2, side, side, 0, 0, SIZE, SIZE);
  return true;
}

// ---------------------------------------------------------------- sending frames

function forgetStaleFrames(now) {
  for (const frames of [session.unacked, session.sentAt]) {
    for (const [id, sentAt] of frames) {
      if (now - sentAt > STALE_FRAME_MS) frames.delete(id);
    }
  }
}

function forgetFrames() {
  session.unacked.clear();
  session.sentAt.clear();
  session.pacer = new Pacer(session.cameraFps);
  session.captureDue = 0;
  clearTimeout(session.captureTimer);
}

// When the next capture may start: paced, the pacer's due time; otherwise the camera's next slot.
function captureDue() {
  return session.pace ? session.pacer.due() : session.captureDue;
}

// Frames are captured on a timer at their due time as well as on display frames: display frames are too
// coarse for the pacer, and a capture whose encoding outlasts one display frame would otherwise wait for the
// next, halving a 60 FPS camera's rate on a 60 Hz display. The timer is set again after each capture and
// whenever the worker's news moves the due time.
function armCaptureTimer() {
  clearTimeout(session.captureTimer);
  if (!session.ready) return;
  session.captureTimer = setTimeout(maybeCapture, Math.max(0, captureDue() - performance.now()));
}

function maybeCapture() {
  const socket = session.socket;
  if (!session.ready || !socket || socket.readyState !== WebSocket.OPEN || session.capturing) return;
  if (document.hidden) return; // a hidden tab sends nothing, and is not billed
  const now = performance.now();
  forgetStaleFrames(now);
  if (session.unacked.size >= MAX_UNACKED) return;
  if (now < captureDue()) return armCaptureTimer();
  if (!drawCameraSquare()) return;
  session.capturing = true;
  if (!session.pace) {
    const interval = 1000 / session.cameraFps;
    session.captureDue = Math.max(session.captureDue + interval, now + interval - CAPTURE_SLACK_MS);
  }
  const capturedAt = now;
  capture.toBlob(
    async (blob) => {
      try {
        if (!blob || socket !== session.socket || socket.readyState !== WebSocket.OPEN) return;
        const jpeg = new Uint8Array(await blob.arrayBuffer());
        const message = new Uint8Array(HEADER_BYTES + jpeg.byteLength);
        const id = session.nextFrameId;
        session.nextFrameId = id >= MAX_FRAME_ID ? 1 : id + 1;
        new DataView(message.buffer).setUint32(HEADER_FRAME_ID_AT, id, true);
        message.set(jpeg, HEADER_BYTES);
        const sentAt = performance.now();
        session.unacked.set(id, sentAt);
        session.sentAt.set(id, sentAt);
        // The pace counts from capture starts: the encoding time is then a constant delay on the way,
        // which the waits absorb, instead of being added to every interval.
        session.pacer.sent(id, capturedAt);
        socket.send(message);
      } finally {
        session.capturing = false;
        armCaptureTimer();
      }
    },
    "image/jpeg",
    JPEG_QUALITY,
  );
}

// Capture is driven by the display and the capture timer, the camera rate cap (or the pacer) and the flow
// control; a hidden tab sends nothing and is not billed.
function captureLoop() {
  if (!session.wanted) return;
  maybeCapture();
  if (session.pendingBitmap) {
    const bitmap = session.pendingBitmap;
    session.pendingBitmap = null;
    outputContext.drawImage(bitmap, 0, 0, SIZE, SIZE);
    bitmap.close();
    if (!session.hasOutput) {
      session.hasOutput = true;
      ui.empty.hidden = true;
      updateControls();
    }
  }
  requestAnimationFrame(captureLoop);
}

// ---------------------------------------------------------------- receiving

async function onBinary(buffer) {
  if (buffer.byteLength <= HEADER_BYTES) return;
  const now = performance.now();
  const view = new DataView(buffer);
  const id = view.getUint32(HEADER_FRAME_ID_AT, true);
  session.pacer.rendered(id, view.getInt16(HEADER_WAITED_MS_AT, true), now);
  const sentAt = session.sentAt.get(id);
  // Ids increase and the worker keeps only the latest frame of a session, so an output for `id` means every
  // older frame was rendered or replaced: none of them will come back (and all of them were acked).
  for (const frames of [session.sentAt, session.unacked]) {
    for (const pending of frames.keys()) {
      if (pending <= id) frames.delete(pending);
    }
  }
  armCaptureTimer();
  if (sentAt !== undefined) session.lastLatency = now - sentAt;
  session.delivered.push(now);
  try {
    const bitmap = await createImageBitmap(new Blob([new Uint8Array(buffer, HEADER_BYTES)], { type: "image/jpeg" }));
    session.pendingBitmap?.close(); // a newer frame arrived before the last was drawn: drop the older
    session.pendingBitmap = bitmap;
  } catch (error) {
    console.warn("undecodable output frame", id, error);
  }
}

function parseMessage(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

function onUsage(message) {
  session.secondsRemaining = message.seconds_remaining;
  session.usageAt = performance.now();
}

function onLastUsage(data) {
  const message = parseMessage(data);
  if (message?.type === "usage") onUsage(message);
}

function onText(data) {
  const message = parseMessage(data);
  if (message === null) return;
  switch (message.type) {
    case "admitted":
      hello(session.socket);
      break;
    case "ack":
      session.unacked.delete(message.frame); // off the wire: the next camera frame may go
      session.pacer.acknowledged(message.round_ms ?? 0);
      armCaptureTimer();
      break;
    case "warming":
      setStatus("warming");
      break;
    case "ready":
      session.ready = true;
      session.pace = message.pace === true;
      session.reconnectAttempt = 0;
      ui.engine.hidden = !message.preview;
      ui.engine.textContent = message.preview ? "PREVIEW · CPU filters" : message.model;
      setStatus("streaming", message.preview ? "(preview engine — no GPU model)" : "");
      showModes(message.modes ?? [], message.mode);
      showAdapters(message.adapters ?? []);
      sendParams();
      sendStyleImage();
      break;
    case "usage":
      onUsage(message);
      break;
    case "error":
      console.warn("worker error", message.code, message.message);
      if (message.frame != null) {
        // A refused frame gets no ack and no output: it is off the wire all the same.
        session.unacked.delete(message.frame);
        session.sentAt.delete(message.frame);
      }
      if (message.code === "render_failed") setStatus("streaming", "(a frame failed to render)");
      if (message.code === "bad_style_image" || message.code === "style_image_too_large") {
        forgetStyleImage();
        styleNote("The worker could not use that picture; try another JPEG, PNG or WebP.", true);
      }
      break;
    case "style_image":
      if (message.active) styleNote("Style image active: you are restyled after it.", false);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------- style image

const STYLE_HELP = ui.styleMessage.textContent;

function styleNote(text, isError) {
  ui.styleMessage.textContent = text;
  ui.styleMessage.dataset.state = isError ? "error" : "ok";
}

function sendStyleImage() {
  const socket = session.socket;
  if (!session.styleMessage || !session.ready || !socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(session.styleMessage);
}

function forgetStyleImage() {
  session.styleMessage = null;
  if (session.styleThumbUrl) URL.revokeObjectURL(session.styleThumbUrl);
  session.styleThumbUrl = null;
  ui.styleThumb.removeAttribute("src");
  ui.styleActive.hidden = true;
  ui.styleInput.value = "";
}

// Any picture, any size: center-cropped to a square and scaled to STYLE_SEND_SIDE² here, so what goes on
// the wire is small whatever was chosen. A file that is not a picture is refused here, with a message;
// the stream is not touched.
async function chooseStyleImage(file) {
  if (!file) return;
  if (!STYLE_FILE_TYPES.includes(file.type)) {
    styleNote(`“${file.name}” is not a JPEG, PNG or WebP picture.`, true);
    ui.styleInput.value = "";
    return;
  }
  if (file.size > STYLE_FILE_MAX_BYTES) {
    styleNote(`“${file.name}” is over 8 MB; choose a smaller picture.`, true);
    ui.styleInput.value = "";
    return;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    styleNote(`“${file.name}” could not be read as a picture.`, true);
    ui.styleInput.value = "";
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = STYLE_SEND_SIDE;
  const side = Math.min(bitmap.width, bitmap.height);
  canvas
    .getContext("2d")
    .drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, STYLE_SEND_SIDE, STYLE_SEND_SIDE);
  bitmap.close();
  const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", STYLE_SEND_QUALITY));
  if (!blob || blob.size > MAX_STYLE_IMAGE_BYTES) {
    styleNote(`“${file.name}” could not be prepared for sending.`, true);
    return;
  }
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const message = new Uint8Array(HEADER_BYTES + bytes.byteLength);
  new DataView(message.buffer).setUint16(HEADER_KIND_AT, KIND_STYLE_IMAGE, true);
  message.set(bytes, HEADER_BYTES);
  forgetStyleImage();
  session.styleMessage = message;
  session.styleThumbUrl = URL.createObjectURL(blob);
  ui.styleThumb.src = session.styleThumbUrl;
  ui.styleActive.hidden = false;
  styleNote(session.ready ? "Sending the style image…" : "Style image chosen: it applies once you stream.", false);
  sendStyleImage();
}

function removeStyleImage() {
  forgetStyleImage();
  styleNote(STYLE_HELP, false);
  const socket = session.socket;
  if (session.ready && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "clear_style" }));
  }
}

ui.styleInput.addEventListener("change", () => chooseStyleImage(ui.styleInput.files?.[0]));
ui.styleRemove.addEventListener("click", removeStyleImage);
ui.stage.addEventListener("dragover", (event) => {
  if (![...(event.dataTransfer?.types ?? [])].includes("Files")) return;
  event.preventDefault();
  ui.stage.dataset.dropping = "";
});
ui.stage.addEventListener("dragleave", () => delete ui.stage.dataset.dropping);
ui.stage.addEventListener("drop", (event) => {
  event.preventDefault();
  delete ui.stage.dataset.dropping;
  chooseStyleImage(event.dataTransfer?.files?.[0]);
});

// ---------------------------------------------------------------- connection

async function fetchTicket(afterRefresh = false) {
  const response = await fetch(root.dataset.ticketUrl, {
    method: "POST",
    headers: { "x-csrftoken": csrfToken, accept: "application/json" },
    credentials: "same-origin",
  });
  if (response.status === 402) return { outOfMinutes: true };
  if (response.status === 401) {
    // The session token expired (a tab asleep past its refresh): refresh it and ask once more. A browser
    // that is signed out is told so by session.js, without leaving a live stream.
    if (!afterRefresh && (await refreshSession()) === "active") return fetchTicket(true);
    throw new Error("signed out");
  }
  if (!response.ok) throw new Error(`ticket request failed: ${response.status}`);
  return response.json();
}

// The connect sequence (docs/protocol.md §1): open the socket, wait for the worker's `admitted`, and only
// then get a ticket and say hello. A cold GPU container takes the socket only once its model is loaded, so
// a ticket fetched before would expire while the socket waits; one fetched now cannot.
function connect() {
  setStatus(session.reconnectAttempt ? "reconnecting" : "connecting");
  // The mode this session starts in: the worker's admission counts what it will cost.
  const mode = selectedMode()?.id;
  const url = mode ? `${root.dataset.workerUrl}?mode=${encodeURIComponent(mode)}` : root.dataset.workerUrl;
  const socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  session.socket = socket;
  session.ready = false;
  forgetFrames();
  socket.addEventListener("message", (event) => {
    if (socket !== session.socket) {
      // The worker's last count for a stream this tab has just stopped (no newer one started) is still
      // the truth the countdown shows.
      if (session.socket === null && typeof event.data === "string") onLastUsage(event.data);
      return;
    }
    if (typeof event.data === "string") onText(event.data);
    else onBinary(event.data);
  });
  socket.addEventListener("close", (event) => onClose(socket, event));
}

async function hello(socket) {
  let ticket;
  try {
    ticket = await fetchTicket();
  } catch (error) {
    console.warn(error);
    if (socket === session.socket) socket.close(CLOSE_NORMAL, "no ticket");
    return scheduleReconnect();
  }
  if (socket !== session.socket || !session.wanted) return;
  if (ticket.outOfMinutes) {
    socket.close(CLOSE_NORMAL, "out of minutes");
    return outOfMinutes();
  }
  socket.send(JSON.stringify({ type: "hello", ticket: ticket.ticket }));
}

function onClose(socket, event) {
  if (socket !== session.socket) return;
  session.socket = null;
  session.ready = false;
  forgetFrames();
  htmx.trigger(document.body, "usage-refresh");
  if (event.code === CLOSE_ALLOWANCE_USED) return outOfMinutes();
  if (event.code === CLOSE_IDLE) return stop("paused"); // nothing was sent for a while: a hidden tab
  if (!session.wanted || event.code === CLOSE_NORMAL) return;
  scheduleReconnect(event.code === CLOSE_WORKER_FULL ? "busy" : "reconnecting");
}

function scheduleReconnect(state = "reconnecting") {
  if (!session.wanted) return;
  const delay = Math.min(10_000, 500 * 2 ** session.reconnectAttempt) * (0.75 + Math.random() * 0.5);
  session.reconnectAttempt += 1;
  setStatus(state);
  clearTimeout(session.reconnectTimer);
  session.reconnectTimer = setTimeout(connect, delay);
}

// ---------------------------------------------------------------- render modes

function modeText(mode) {
  return mode.approximate ? `${mode.label} — approximate` : mode.label;
}

function selectedMode() {
  return session.modes.find((mode) => mode.id === ui.mode.value) ?? null;
}

// Fill the Quality select from `ready`: keep the user's choice across reconnects when the engine still
// offers it, otherwise show the session's mode (the engine's default, its first mode).
function showModes(modes, current) {
  const chosen = ui.mode.value;
  session.modes = modes;
  ui.mode.replaceChildren(
    ...modes.map((mode) => {
      const option = new Option(modeText(mode), mode.id);
      option.title = mode.detail;
      return option;
    }),
  );
  const keep = modes.some((mode) => mode.id === chosen) ? chosen : current;
  ui.mode.value = modes.some((mode) => mode.id === keep) ? keep : (modes[0]?.id ?? "");
  ui.modeField.hidden = modes.length === 0;
  ui.mode.disabled = modes.length < 2; // nothing to choose
  showMode();
}

function showMode() {
  const mode = selectedMode();
  ui.modeHelp.textContent = mode?.detail ?? "";
  ui.mode.title = mode?.detail ?? "";
  ui.modeLabel.hidden = !mode;
  ui.modeLabel.textContent = mode ? (mode.approximate ? `${mode.label} · approx.` : mode.label) : "";
  ui.modeLabel.title = mode?.detail ?? "";
  if (mode?.approximate) ui.modeLabel.dataset.approximate = "";
  else delete ui.modeLabel.dataset.approximate;
}

// ---------------------------------------------------------------- params

function currentParams() {
  const seed = Number.parseInt(ui.seed.value, 10);
  const params = {
    type: "params",
    prompt: ui.prompt.value.trim().slice(0, MAX_PROMPT_CHARS) || root.dataset.defaultPrompt,
    steps: Number.parseInt(ui.steps.value, 10),
    seed: Number.isFinite(seed) && seed >= 0 ? Math.min(seed, MAX_SEED) : 0,
  };
  if (selectedMode()) params.mode = ui.mode.value;
  // Only to a worker that serves adapters: one that serves none has nothing to turn off.
  if (session.adapters.length > 0) {
    params.adapter = session.adapter;
    if (session.adapter !== null) params.adapter_scale = Number.parseFloat(ui.adapterScale.value);
  }
  return params;
}

// ---------------------------------------------------------------- LoRA adapters

function servedAdapter(name) {
  return session.adapters.find((adapter) => adapter.name === name) ?? null;
}

// Show the adapter presets whose adapter this worker serves (a reconnect may reach one that serves others);
// an active adapter the worker no longer has is dropped, with its preset's pressed state.
function showAdapters(adapters) {
  session.adapters = adapters;
  for (const preset of ui.presets) {
    if (preset.dataset.adapter === undefined) continue;
    preset.hidden = servedAdapter(preset.dataset.adapter) === null;
    if (preset.hidden) preset.setAttribute("aria-pressed", "false");
  }
  if (session.adapter !== null && servedAdapter(session.adapter) === null) session.adapter = null;
  showAdapterScale();
}

function showAdapterScale() {
  ui.adapterScaleField.hidden = session.adapter === null;
  ui.adapterScaleValue.textContent = Number.parseFloat(ui.adapterScale.value).toFixed(2);
}

function sendParams() {
  const socket = session.socket;
  if (socket && socket.readyState === WebSocket.OPEN && session.ready) {
    socket.send(JSON.stringify(currentParams()));
  }
}

let paramsTimer = 0;
function sendParamsSoon() {
  clearTimeout(paramsTimer);
  paramsTimer = setTimeout(sendParams, PARAMS_DEBOUNCE_MS);
}

function choosePreset(button) {
  for (const other of ui.presets) other.setAttribute("aria-pressed", String(other === button));
  ui.prompt.value = button.dataset.prompt;
  const adapter = button.dataset.adapter === undefined ? null : servedAdapter(button.dataset.adapter);
  session.adapter = adapter?.name ?? null;
  if (adapter) ui.adapterScale.value = String(button.dataset.adapterScale ?? adapter.scale);
  showAdapterScale();
  clearTimeout(paramsTimer);
  sendParams(); // a click is deliberate: no need to wait
}

// ---------------------------------------------------------------- start / stop

async function start() {
  if (session.wanted) return;
  session.wanted = true;
  session.reconnectAttempt = 0;
  updateControls();
  try {
    await openCamera();
  } catch (error) {
    session.wanted = false;
    updateControls();
    setStatus("error", "Camera unavailable — allow camera access and try again.");
    console.warn(error);
    return;
  }
  requestAnimationFrame(captureLoop);
  connect();
}

function stop(finalState = "idle") {
  session.wanted = false;
  clearTimeout(session.reconnectTimer);
  const socket = session.socket;
  session.socket = null;
  session.ready = false;
  forgetFrames();
  if (socket && socket.readyState <= WebSocket.OPEN) socket.close(CLOSE_NORMAL, "stopped");
  if (session.recorder) stopRecording();
  closeCamera();
  setStatus(finalState);
  updateControls();
  htmx.trigger(document.body, "usage-refresh");
}

function outOfMinutes() {
  stop("out-of-minutes");
  session.secondsRemaining = 0;
  htmx.ajax("GET", "/partials/plan-cards", { target: "#paywall-plans", swap: "innerHTML" });
  if (!ui.paywall.open) ui.paywall.showModal();
}

// ---------------------------------------------------------------- record and snapshot

function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function timestamp() {
  return new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
}

function snapshot() {
  output.toBlob((blob) => blob && download(blob, `stylecast-${timestamp()}.png`), "image/png");
}

function pickRecordingType() {
  const candidates = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm"];
  return candidates.find((type) => MediaRecorder.isTypeSupported(type)) ?? "";
}

function startRecording() {
  const mimeType = pickRecordingType();
  const recorder = new MediaRecorder(output.captureStream(30), mimeType ? { mimeType } : undefined);
  const chunks = [];
  recorder.addEventListener("dataavailable", (event) => event.data.size && chunks.push(event.data));
  recorder.addEventListener("stop", () => {
    download(new Blob(chunks, { type: recorder.mimeType || "video/webm" }), `stylecast-${timestamp()}.webm`);
  });
  recorder.start(1000);
  session.recorder = recorder;
  ui.record.setAttribute("aria-pressed", "true");
  ui.record.textContent = "Stop recording";
  ui.rec.hidden = false;
}

function stopRecording() {
  session.recorder?.stop();
  session.recorder = null;
  ui.record.setAttribute("aria-pressed", "false");
  ui.record.textContent = "Record";
  ui.rec.hidden = true;
  updateControls();
}

// ---------------------------------------------------------------- wiring

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => stop());
ui.snapshot.addEventListener("click", snapshot);
ui.record.addEventListener("click", () => (session.recorder ? stopRecording() : startRecording()));
ui.prompt.addEventListener("input", () => {
  for (const preset of ui.presets) preset.setAttribute("aria-pressed", String(preset.dataset.prompt === ui.prompt.value));
  sendParamsSoon();
});
ui.steps.addEventListener("change", sendParams);
ui.mode.addEventListener("change", () => {
  showMode();
  sendParams(); // live, on the same socket, like the prompt
});
ui.seed.addEventListener("change", () => {
  ui.seed.value = String(currentParams().seed); // the box shows the seed in use, not what was out of range
  sendParams();
});
ui.reseed.addEventListener("click", () => {
  ui.seed.value = String(Math.floor(Math.random() * MAX_SEED));
  sendParams();
});
for (const button of ui.presets) button.addEventListener("click", () => choosePreset(button));
ui.adapterScale.addEventListener("input", () => {
  showAdapterScale();
  sendParamsSoon(); // a drag sends its last value, like typing a prompt
});
window.addEventListener("pagehide", () => session.wanted && stop());
// A stream paused because the tab was hidden (the worker closed it as idle) resumes when it is seen again.
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && root.dataset.state === "paused") start();
});
holdNavigation(() => session.wanted); // a sign-out while streaming shows a notice instead of leaving

setStatus("idle");
updateControls();
