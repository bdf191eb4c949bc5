"use strict";
// Says so when the last attempt failed (the server sends the form back with ?failed=1).
if (new URLSearchParams(window.location.search).get("failed") === "1") {
  document.getElementById("failed").hidden = false;
}
