package amqp

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"io/fs"
	"net/http"
	"path"
	"sync"
	"time"
)

// The built-in web UI: the static files in ui/ (HTML, CSS and JavaScript, written by hand,
// with no build step and nothing fetched from elsewhere), embedded in the binary and
// served by ManagementHandler next to the API: GET / is the page, GET /ui/{file} its
// assets. The page calls the API (api/...) with the user's HTTP Basic credentials, which
// it keeps in the browser tab's sessionStorage; the files themselves need no login.

//go:embed ui
var uiFiles embed.FS

// uiCSP is the Content-Security-Policy of the UI's responses. Scripts, styles, images
// and API calls come from the broker itself, and nothing else loads: no inline script or
// style, no eval, no plugins, no forms posted anywhere, no page may frame the UI, and
// Trusted Types without a policy make every DOM sink that parses HTML or runs script
// refuse a string, so data reaches the page as text only.
const uiCSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"base-uri 'none'; form-action 'none'; frame-ancestors 'none'; " +
	"require-trusted-types-for 'script'; trusted-types 'none'"

// uiAsset is an embedded file, ready to serve.
type uiAsset struct {
	body        []byte
	contentType string
	etag        string
}

// uiAssets reads the embedded files once.
var uiAssets = sync.OnceValue(func() map[string]uiAsset {
	types := map[string]string{".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
		".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
	assets := map[string]uiAsset{}
	entries, err := fs.ReadDir(uiFiles, "ui")
	if err != nil {
		panic("amqp: embedded ui: " + err.Error()) // cannot happen: the directory is compiled in
	}
	for _, e := range entries {
		ct, ok := types[path.Ext(e.Name())]
		if e.IsDir() || !ok {
			continue
		}
		b, err := fs.ReadFile(uiFiles, "ui/"+e.Name())
		if err != nil {
			panic("amqp: embedded ui: " + err.Error())
		}
		sum := sha256.Sum256(b)
		assets[e.Name()] = uiAsset{body: b, contentType: ct, etag: `"` + base64.RawURLEncoding.EncodeToString(sum[:12]) + `"`}
	}
	return assets
})

// mountUI adds the UI's routes to the management API's router.
func mountUI(rt *apiRouter) {
	rt.handle("GET /", http.HandlerFunc(serveUI))
	rt.handle("GET /ui/{file}", http.HandlerFunc(serveUI))
}

// serveUI serves index.html at / and the named file at /ui/{file}, with the CSP and the
// other headers that keep the page to itself. Files are revalidated by ETag.
func serveUI(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", uiCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	name := r.PathValue("file")
	if r.Pattern == "GET /" {
		name = "index.html"
	}
	a, ok := uiAssets()[name]
	if !ok {
		http.Error(w, "404 page not found", http.StatusNotFound)
		return
	}
	h.Set("Content-Type", a.contentType)
	h.Set("ETag", a.etag)
	h.Set("Cache-Control", "no-cache")
	http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(a.body))
}
