// Sessions on the datastore /folder path, and faults a test can turn on.
//
// vcsim serves /folder to anyone; vCenter wants the session cookie of a
// logged-in user. The double keeps the cookies that Login handed out (until
// Logout) and answers /folder without one of them with 401, so a test proves
// that the reader really sends the session cookie.
//
// POST /sendense-double/faults {"snapshot_failures": N, "folder_drop_after": BYTES}
// (either key optional): the next N CreateSnapshot_Task calls fail with a
// SnapshotFault; once /folder has sent BYTES more bytes of file data, every
// /folder answer is cut off (the connection drops mid-body), until the value
// is set to -1. GET /sendense-double/state answers counters as JSON.
package main

import (
	"bytes"
	"encoding/json"
	"io/ioutil"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
)

var faults = struct {
	sync.Mutex
	snapshotFailures int
	dropAfter        int64 // -1: off
	sessions         map[string]bool
	folderBytes      int64
	folderRequests   int64
	folderRefused    int64
}{dropAfter: -1, sessions: map[string]bool{}}

const sessionCookie = "vmware_soap_session"

func takeSnapshotFault() string {
	faults.Lock()
	defer faults.Unlock()
	if faults.snapshotFailures <= 0 {
		return ""
	}
	faults.snapshotFailures--
	return "An error occurred while saving the snapshot: injected by the test double"
}

func cookieValue(v string) string {
	return strings.Trim(v, `"`)
}

// dropWriter counts the file bytes /folder sends and aborts the answer once the
// armed limit is passed.
type dropWriter struct {
	http.ResponseWriter
}

func (d dropWriter) Write(p []byte) (int, error) {
	faults.Lock()
	limit := faults.dropAfter
	allowed := int64(len(p))
	if limit >= 0 {
		left := limit - faults.folderBytes
		if left < 0 {
			left = 0
		}
		if left < allowed {
			allowed = left
		}
	}
	faults.folderBytes += allowed
	faults.Unlock()
	n, err := d.ResponseWriter.Write(p[:allowed])
	if err != nil {
		return n, err
	}
	if allowed < int64(len(p)) {
		panic(http.ErrAbortHandler) // net/http drops the connection
	}
	return n, nil
}

func wrapFaults(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/sendense-double/faults" && r.Method == http.MethodPost:
			var req struct {
				SnapshotFailures *int   `json:"snapshot_failures"`
				FolderDropAfter  *int64 `json:"folder_drop_after"`
			}
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			faults.Lock()
			if req.SnapshotFailures != nil {
				faults.snapshotFailures = *req.SnapshotFailures
			}
			if req.FolderDropAfter != nil {
				faults.dropAfter = *req.FolderDropAfter
				faults.folderBytes = 0
			}
			faults.Unlock()
			writeState(w)
		case r.URL.Path == "/sendense-double/state":
			writeState(w)
		case strings.HasPrefix(r.URL.Path, "/folder/"):
			c, err := r.Cookie(sessionCookie)
			faults.Lock()
			faults.folderRequests++
			ok := err == nil && faults.sessions[cookieValue(c.Value)]
			if !ok {
				faults.folderRefused++
			}
			faults.Unlock()
			if !ok {
				http.Error(w, "no valid vmware_soap_session cookie", http.StatusUnauthorized)
				return
			}
			if r.Method == http.MethodGet || r.Method == http.MethodHead {
				next.ServeHTTP(dropWriter{w}, r)
				return
			}
			next.ServeHTTP(w, r)
		case r.URL.Path == "/sdk" && r.Method == http.MethodPost:
			body, _ := ioutil.ReadAll(r.Body)
			r.Body = ioutil.NopCloser(bytes.NewReader(body))
			switch {
			case bytes.Contains(body, []byte("<Login ")) || bytes.Contains(body, []byte("<Login>")):
				rec := httptest.NewRecorder()
				next.ServeHTTP(rec, r)
				if rec.Code == http.StatusOK {
					for _, c := range rec.Result().Cookies() {
						if c.Name == sessionCookie {
							faults.Lock()
							faults.sessions[cookieValue(c.Value)] = true
							faults.Unlock()
						}
					}
				}
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				w.Write(rec.Body.Bytes())
			case bytes.Contains(body, []byte("<Logout")):
				if c, err := r.Cookie(sessionCookie); err == nil {
					faults.Lock()
					delete(faults.sessions, cookieValue(c.Value))
					faults.Unlock()
				}
				next.ServeHTTP(w, r)
			default:
				next.ServeHTTP(w, r)
			}
		default:
			next.ServeHTTP(w, r)
		}
	})
}

func writeState(w http.ResponseWriter) {
	faults.Lock()
	state := map[string]interface{}{
		"snapshot_failures": faults.snapshotFailures,
		"folder_drop_after": faults.dropAfter,
		"folder_bytes":      faults.folderBytes,
		"folder_requests":   faults.folderRequests,
		"folder_refused":    faults.folderRefused,
		"sessions":          len(faults.sessions),
	}
	faults.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(state)
}
