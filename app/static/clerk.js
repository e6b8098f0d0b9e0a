// Live mode only: loads ClerkJS (and Clerk's UI bundle; both from the instance's Frontend API host, see
// templates/partials/session_scripts.html), mounts Clerk's sign-in (which also signs new users up) and
// user button, and tells session.js how to refresh the session token. ClerkJS keeps the `__session`
// cookie fresh while a tab is open; the server verifies that cookie on every request.

import { registerRefresher } from "/static/session.js";

// A page that keeps sending a signed-in browser from /sign-in back to where it came from would loop if
// the server refused the token it holds; after one try within this window the sign-in page stays put.
const REDIRECT_GUARD_MS = 15_000;

function whenClerkReady() {
  // The two deferred scripts run before this module; on `load` they have either run or failed.
  const ready = () => window.Clerk && window.__internal_ClerkUICtor;
  if (ready()) return Promise.resolve(window.Clerk);
  return new Promise((resolve, reject) => {
    window.addEventListener(
      "load",
      () => (ready() ? resolve(window.Clerk) : reject(new Error("ClerkJS did not load"))),
      { once: true },
    );
  });
}

let clerk = null;
try {
  clerk = await whenClerkReady();
  await clerk.load({
    ui: { ClerkUI: window.__internal_ClerkUICtor },
    signInUrl: "/sign-in",
    afterSignOutUrl: "/",
  });
} catch (error) {
  console.warn("ClerkJS could not start", error);
  clerk = null;
}

registerRefresher(async () => {
  if (clerk === null) return "unavailable";
  if (!clerk.session) return "signed-out";
  try {
    // A token fetched past the cache is also written to the `__session` cookie by ClerkJS.
    const token = await clerk.session.getToken({ skipCache: true });
    return token ? "active" : "signed-out";
  } catch (error) {
    console.warn("session token refresh failed", error);
    return "unavailable";
  }
});

const signIn = document.getElementById("clerk-sign-in");
if (clerk !== null && signIn) {
  const redirect = signIn.dataset.redirect || "/studio";
  const lastTry = Number(sessionStorage.getItem("stylecast-sign-in-redirect") || 0);
  if (clerk.user && Date.now() - lastTry > REDIRECT_GUARD_MS) {
    sessionStorage.setItem("stylecast-sign-in-redirect", String(Date.now()));
    await clerk.session?.getToken({ skipCache: true });
    window.location.assign(redirect);
  } else if (clerk.user) {
    signIn.textContent = "You are signed in, but this site could not verify your session. Try again shortly.";
  } else {
    clerk.mountSignIn(signIn, {
      withSignUp: true,
      forceRedirectUrl: redirect,
      signUpForceRedirectUrl: redirect,
    });
  }
}

const userButton = document.getElementById("clerk-user-button");
if (clerk !== null && userButton) {
  clerk.mountUserButton(userButton);
}
