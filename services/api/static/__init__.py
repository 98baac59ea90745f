"""Static files the API serves (the browser tracker, GET /v1/tracker.js); a package so that they ship."""
