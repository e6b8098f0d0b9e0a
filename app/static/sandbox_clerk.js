// Sandbox mode only: what ClerkJS does to keep a session token fresh, against the sandbox's Frontend API
// (the Clerk emulator's /sandbox/clerk/v1/client, same origin). The browser's HttpOnly `__client` cookie
// proves who it is; each answer sets a new 60-second `__session` cookie. Every 50 seconds while a tab is
// open, as ClerkJS does, and whenever session.js asks (an htmx request answered 401, the refresh page).

import { refreshSession, registerRefresher } from "/static/session.js";

const CLIENT = "/sandbox/clerk/v1/client";
const REFRESH_EVERY_MS = 50_000; // the token lives 60 s: ten to spare for a slow answer

let sessionId = null;

function clientSignedIn() {
  const match = document.cookie.match(/(?:^|;\s*)__client_uat=(\d+)/);
  return match !== null && Number(match[1]) > 0;
}

async function activeSessionId() {
  const answer = await fetch(CLIENT, { credentials: "same-origin", headers: { accept: "application/json" } });
  if (!answer.ok) throw new Error(`reading the client: ${answer.status}`);
  const body = await answer.json();
  return body.response?.last_active_session_id ?? null;
}

function mintToken(id) {
  return fetch(`${CLIENT}/sessions/${encodeURIComponent(id)}/tokens`, {
    method: "POST",
    credentials: "same-origin",
    headers: { accept: "application/json" },
  });
}

async function refresh() {
  try {
    sessionId ??= await activeSessionId();
    if (sessionId === null) return "signed-out";
    let answer = await mintToken(sessionId);
    if (answer.status === 404) {
      // The client is signed in with another session now (signed in again in another tab).
      sessionId = await activeSessionId();
      if (sessionId === null) return "signed-out";
      answer = await mintToken(sessionId);
    }
    if (answer.ok) return "active";
    if (answer.status === 401 || answer.status === 404) {
      sessionId = null;
      return "signed-out";
    }
    return "unavailable";
  } catch (error) {
    console.warn("sandbox session refresh failed", error);
    return "unavailable";
  }
}

registerRefresher(refresh);

setInterval(() => {
  if (clientSignedIn()) refreshSession();
}, REFRESH_EVERY_MS);
