// Live mode only: mounts Clerk's sign-in component and user button once ClerkJS has loaded.
// ClerkJS itself comes from the instance's Frontend API host (a script tag in base.html) and keeps the
// `__session` cookie fresh; the server verifies that cookie on every request.

function whenClerkReady() {
  return new Promise((resolve) => {
    if (window.Clerk) return resolve(window.Clerk);
    const script = document.querySelector("script[data-clerk-publishable-key]");
    script?.addEventListener("load", () => resolve(window.Clerk), { once: true });
  });
}

const clerk = await whenClerkReady();
await clerk.load();

const signIn = document.getElementById("clerk-sign-in");
if (signIn) {
  const redirect = signIn.dataset.redirect || "/studio";
  if (clerk.user) {
    window.location.assign(redirect);
  } else {
    clerk.mountSignIn(signIn, { forceRedirectUrl: redirect, signUpForceRedirectUrl: redirect });
  }
}

const userButton = document.getElementById("clerk-user-button");
if (userButton) {
  clerk.mountUserButton(userButton, { afterSignOutUrl: "/" });
}
