// Staying signed in, the part every page shares. Session tokens live 60 seconds; something must fetch a
// fresh one before the server sees an expired one, and again whenever it does. Live mode's clerk.js (with
// ClerkJS) and sandbox mode's sandbox_clerk.js each register how; this module decides what a page does
// with the answer:
//
// * the refresh page the server sends for a page load with an expired token: refresh, then load the
//   page again (or go to sign-in when the session has ended);
// * an htmx request answered 401: refresh; the poll that got it simply tries again on its next tick;
// * a definite "signed out": go to the sign-in page, unless something on the page holds navigation (the
//   studio while a stream is live), which gets a notice instead.

let refresher = null;
const waitingForRefresher = [];
let inFlight = null;
const holds = new Set();
// 401s that came right after a refresh said "active": the server keeps refusing what the browser holds.
let refusedAfterRefresh = 0;
const MAX_REFUSED_AFTER_REFRESH = 3;

function here() {
  return encodeURIComponent(location.pathname + location.search);
}

/** Register `refresh() -> Promise<"active" | "signed-out" | "unavailable">`: "active" once a fresh
 * `__session` cookie is set, "signed-out" when the browser's session has ended, "unavailable" when the
 * sign-in service could not be asked (try again later). */
export function registerRefresher(refresh) {
  refresher = refresh;
  for (const resolve of waitingForRefresher.splice(0)) resolve(refresh);
}

function whenRegistered() {
  return refresher ? Promise.resolve(refresher) : new Promise((resolve) => waitingForRefresher.push(resolve));
}

async function askRefresher() {
  try {
    return await (await whenRegistered())();
  } catch (error) {
    console.warn("session refresh failed", error);
    return "unavailable";
  }
}

/** Refresh the session token now (one refresh at a time, however many callers). A "signed-out" answer
 * also signs the page out (see `signedOut`). */
export function refreshSession() {
  inFlight ??= askRefresher().then((outcome) => {
    inFlight = null;
    if (outcome === "signed-out") signedOut();
    return outcome;
  });
  return inFlight;
}

/** While `isBusy()` is true, a sign-out does not navigate away from this page. */
export function holdNavigation(isBusy) {
  holds.add(isBusy);
}

function showSignedOutNotice() {
  if (document.querySelector("[data-testid=signed-out-notice]")) return;
  const notice = document.createElement("p");
  notice.className = "alert alert-error signed-out-notice";
  notice.setAttribute("role", "alert");
  notice.dataset.testid = "signed-out-notice";
  notice.append("You have been signed out. What is running keeps running until you stop it. ");
  const link = document.createElement("a");
  link.href = `/sign-in?next=${here()}`;
  link.textContent = "Sign in again";
  notice.append(link);
  (document.getElementById("main") ?? document.body).prepend(notice);
}

/** The browser's session has ended: to the sign-in page, or a notice while navigation is held. */
export function signedOut() {
  if ([...holds].some((isBusy) => isBusy())) {
    showSignedOutNotice();
    return;
  }
  location.assign(`/sign-in?next=${here()}`);
}

document.addEventListener("htmx:responseError", async (event) => {
  if (event.detail?.xhr?.status !== 401) return;
  const outcome = await refreshSession();
  if (outcome !== "active") return;
  refusedAfterRefresh += 1;
  if (refusedAfterRefresh > MAX_REFUSED_AFTER_REFRESH) signedOut();
});

document.addEventListener("htmx:afterRequest", (event) => {
  if (event.detail?.successful) refusedAfterRefresh = 0;
});

async function resolveRefreshPage(signInUrl) {
  const outcome = await askRefresher();
  if (outcome === "active") {
    location.replace(location.href);
  } else if (outcome === "signed-out") {
    location.replace(signInUrl);
  } else {
    const failed = document.getElementById("session-refresh-failed");
    failed.querySelector("[data-retry]").href = location.href;
    failed.hidden = false;
  }
}

const refreshPage = document.body?.dataset.sessionRefresh;
if (refreshPage !== undefined) resolveRefreshPage(refreshPage);
