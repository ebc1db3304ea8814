// Drive one REAL Node analytics SDK against a Segment-compatible server.
//
// Usage: node send.mjs <client> <baseUrl> <writeKey> <runId>
//   client: segment-node | cio-node | rudder-node
//
// Makes exactly one identify, track, page, screen, group and alias call with
// ids derived from <runId>, flushes/closes the client, and prints ONE JSON line
// on stdout:
//   {"client": ..., "library": {"name", "package"}, "calls": [...],
//    "messageIds": [...], "timestamps": [...],
//    "http": [{"status": 200, "events": 5, "retryHeader": null}, ...],
//    "errors": []}
// messageIds/timestamps are in the order of "calls", as they went over the
// wire. "http" lists every HTTP attempt the client made (seen through the
// client's own hooks), so a caller can check that nothing was retried.
// Exit status: 0 only if the client reported no delivery error and every call's
// callback fired; otherwise the errors go to stderr and the exit status is 1.
//
// All three clients offer all six calls (segment-node's `screen` is
// undocumented on Segment's site but present in the 3.1.0 API; rudder-node's
// `screen` requires `name`). Client-side retries are switched off through each
// client's documented option (segment-node and cio-node `maxRetries: 0`,
// rudder-node `retryCount: 0`), so any non-success answer shows up as a
// delivery error instead of being papered over by a retry. Every other
// setting (batch size, flush interval, gzip) is the client's default.

import { createRequire } from 'node:module'
import zlib from 'node:zlib'

// Client loggers (rudder-node uses console.info) must not pollute stdout,
// which carries exactly one JSON line.
const writeStdout = (s) => process.stdout.write(s)
for (const m of ['log', 'info', 'debug']) console[m] = (...a) => console.error(...a)

const require = createRequire(import.meta.url)

const [client, baseUrl, writeKey, runId] = process.argv.slice(2)
const CLIENTS = ['segment-node', 'cio-node', 'rudder-node']
if (!CLIENTS.includes(client) || !baseUrl || !writeKey || !runId) {
  console.error(
    `usage: node send.mjs <${CLIENTS.join('|')}> <baseUrl> <writeKey> <runId>`
  )
  process.exit(2)
}

const userId = `u-${runId}`
const anonymousId = `anon-${runId}`

// The six calls, in the order they are made. Field names follow the
// Segment spec, which all three Node clients use for their parameters.
const CALLS = [
  {
    type: 'identify',
    userId,
    traits: { email: `${runId}@example.com`, name: 'Ada' },
  },
  {
    type: 'track',
    userId,
    event: 'Order Completed',
    properties: { revenue: 9.99, currency: 'USD', order_id: `o-${runId}` },
  },
  {
    type: 'page',
    userId,
    category: 'Docs',
    name: 'Intro',
    properties: { path: '/x' },
  },
  { type: 'screen', anonymousId, name: 'Home' },
  { type: 'group', userId, groupId: `g-${runId}`, traits: { name: 'Acme' } },
  { type: 'alias', previousId: anonymousId, userId },
]

const errors = []
const http = []
// What went over the wire, per call type: {messageId, timestamp}. timestamp is
// the client's own event time as sent (`timestamp` for segment-node and
// cio-node, `originalTimestamp` for rudder-node).
const sentByType = {}
const fmtErr = (e) =>
  e instanceof Error ? `${e.name}: ${e.message}` : typeof e === 'string' ? e : JSON.stringify(e)

// Note the events of one request body; returns how many it carried.
function noteBatch(body) {
  let parsed
  try {
    parsed = typeof body === 'string' ? JSON.parse(body) : body
  } catch {
    return null
  }
  if (!parsed || !Array.isArray(parsed.batch)) return null
  for (const m of parsed.batch) {
    sentByType[m.type] = { messageId: m.messageId, timestamp: m.timestamp ?? m.originalTimestamp ?? null }
  }
  return parsed.batch.length
}

// ---------------------------------------------------------------------------
// segment-node and cio-node share analytics-next's node API:
//   analytics.<type>(params, (err, ctx) => ...), analytics.closeAndFlush()
// ---------------------------------------------------------------------------
async function runSegmentLike(mod, name, settings) {
  const analytics = new mod.Analytics(settings)
  const pending = new Set()

  analytics.on('error', (e) => {
    errors.push(`${name} emitted error ${e && e.code}: ${fmtErr(e && e.reason)}`)
  })
  // segment-node emits http_request and http_response; cio-node only
  // http_request.
  // Match each response to its request by body (the same string is passed to
  // both events), so concurrent batches are paired correctly.
  analytics.on('http_request', (req) => {
    const retryHeader = req.headers['X-Retry-Count'] ?? null
    http.push({ status: null, events: noteBatch(req.body), retryHeader, _body: req.body })
  })
  if (name === 'cio-node') {
    // cio-node emits no http_response; it calls globalThis.fetch at send time
    // (src/lib/fetch.ts), so observe the status by wrapping it.
    const realFetch = globalThis.fetch
    globalThis.fetch = async (url, init) => {
      const res = await realFetch(url, init)
      const attempt = http.find((a) => a.status === null && a._body === (init && init.body))
      if (attempt) attempt.status = res.status
      return res
    }
  }
  analytics.on('http_response', (res) => {
    const attempt = http.find((a) => a.status === null && a._body === res.body)
    if (attempt) attempt.status = res.status
    else http.push({ status: res.status, events: null, retryHeader: null })
  })

  for (const call of CALLS) {
    const { type, ...params } = call
    pending.add(type)
    analytics[type](params, (err) => {
      pending.delete(type)
      if (err) errors.push(`${name} ${type} callback error: ${fmtErr(err)}`)
    })
  }
  // Stops accepting events, flushes everything and waits for the callbacks.
  await analytics.closeAndFlush({ timeout: 30000 })
  for (const type of pending) errors.push(`${name} ${type}: callback never fired`)
}

// ---------------------------------------------------------------------------
// rudder-node: analytics.<type>(message, callback(err, batchData)),
// analytics.flush(callback). Sends the first event alone, right away; the rest
// wait for flushAt (20) or flushInterval (10 s), so flush() is required.
// Body is gzipped by default. The request body (messageIds, timestamps) and
// the status of every attempt are read through axios interceptors on the
// client's own axios instance.
// ---------------------------------------------------------------------------
async function runRudder(Analytics) {
  const analytics = new Analytics(writeKey, {
    dataPlaneUrl: baseUrl,
    retryCount: 0,
    errorHandler: (err) => {
      errors.push(`rudder-node errorHandler: ${fmtErr(err)}${err && err.response ? ` [HTTP ${err.response.status}]` : ''}`)
    },
  })
  const pending = new Set()
  const decode = (data) => {
    try {
      const buf = Buffer.isBuffer(data) ? zlib.gunzipSync(data) : data
      return typeof buf === 'string' || Buffer.isBuffer(buf) ? JSON.parse(buf.toString()) : buf
    } catch {
      return null
    }
  }
  analytics.axiosInstance.interceptors.request.use((config) => {
    const events = noteBatch(decode(config.data))
    config.__trackpipeAttempt = { status: null, events, retryHeader: null }
    http.push(config.__trackpipeAttempt)
    return config
  })
  analytics.axiosInstance.interceptors.response.use(
    (res) => {
      if (res.config.__trackpipeAttempt) res.config.__trackpipeAttempt.status = res.status
      return res
    },
    (err) => {
      const attempt = err && err.config && err.config.__trackpipeAttempt
      if (attempt) attempt.status = err.response ? err.response.status : null
      return Promise.reject(err)
    }
  )

  for (const call of CALLS) {
    const { type, ...params } = call
    pending.add(type)
    analytics[type](params, (err) => {
      pending.delete(type)
      if (err) errors.push(`rudder-node ${type} callback error: ${fmtErr(err)}`)
    })
  }
  await new Promise((resolve) => {
    analytics
      .flush((err) => {
        if (err) errors.push(`rudder-node flush error: ${fmtErr(err)}`)
        resolve()
      })
      .catch((err) => {
        errors.push(`rudder-node flush rejected: ${fmtErr(err)}`)
        resolve()
      })
  })
  // Per-event callbacks run via setImmediate after the batch resolves.
  await new Promise((r) => setTimeout(r, 50))
  for (const type of pending) errors.push(`rudder-node ${type}: callback never fired`)
}

async function main() {
  let library
  if (client === 'segment-node') {
    const mod = require('@segment/analytics-node')
    library = { name: '@segment/analytics-node', package: require('@segment/analytics-node/package.json').version }
    await runSegmentLike(mod, client, { writeKey, host: baseUrl, maxRetries: 0 })
  } else if (client === 'cio-node') {
    const mod = require('@customerio/cdp-analytics-node')
    library = { name: '@customerio/cdp-analytics-node', package: require('@customerio/cdp-analytics-node/package.json').version }
    await runSegmentLike(mod, client, { writeKey, host: baseUrl, maxRetries: 0 })
  } else {
    const Analytics = require('@rudderstack/rudder-sdk-node')
    library = { name: 'analytics-node', package: require('@rudderstack/rudder-sdk-node/package.json').version }
    await runRudder(Analytics)
  }
  for (const a of http) {
    delete a._body
    if (a.status !== 200) errors.push(`${client}: HTTP attempt answered ${a.status}, expected exactly 200`)
  }
  // In the order of CALLS; null where nothing went over the wire.
  const messageIds = CALLS.map((c) => (sentByType[c.type] || {}).messageId ?? null)
  const timestamps = CALLS.map((c) => (sentByType[c.type] || {}).timestamp ?? null)
  const out = { client, library, calls: CALLS, messageIds, timestamps, http, errors }
  writeStdout(JSON.stringify(out) + '\n')
  for (const e of errors) console.error(e)
  return errors.length ? 1 : 0
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`${client}: crashed: ${err && err.stack ? err.stack : err}`)
    process.exit(1)
  }
)
