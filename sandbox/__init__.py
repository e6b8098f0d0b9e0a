"""Stand-ins for the services a live deployment pays for, so the whole product runs offline (sandbox mode).

* `clerk_emulator`: Clerk's Backend API (users, metadata, sessions, sign-in tokens) and the part of its
  Frontend API a browser uses to stay signed in; `clerk_sessions` is its store of clients and sessions.
* `chargebee_emulator`: ChargeBee's API, hosted checkout and portal pages, and its webhooks.
* `keys`: the secrets sandbox mode generates on first start; `files`: how sandbox state reaches the disk.

The emulators answer the real SDKs over HTTP with the services' own formats, errors and limits, and know
nothing of the web app: it decides where to mount them (`api_path`, `mount_path`) and talks to them like
any client.
"""
