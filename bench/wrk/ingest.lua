-- wrk script for bench/ingest.py: POST a JSON body in which every event gets a
-- messageId nobody has sent before, so trackpipe's dedup cannot drop anything.
--
--   wrk -s bench/wrk/ingest.lua URL -- <template file> <run nonce> <Authorization value>
--
-- The template is the request body with the literal @@MID@@ at the start of each
-- event's messageId; the text after it ("-0", "-1", ... "-99") already differs per
-- event. init() splits the template at the marks once; each request puts the same
-- "<nonce>-<thread>-<request#>" into every gap and joins the pieces with one
-- table.concat. (string.gsub over the 100 KB body is ~7x slower and made wrk, not
-- the server, the bottleneck.)
--
-- With WRK_CHECK=1 in the environment a response() callback also counts non-2xx
-- statuses and keeps the first few bodies (wrk itself only counts them).
-- done() prints one line "WRKJSON {...}" that bench/ingest.py parses.

local threads = {}
local next_tid = 0

function setup(thread)
   next_tid = next_tid + 1
   thread:set("tid", next_tid)
   table.insert(threads, thread)
end

local pieces = {}   -- template text at odd indexes, the messageId prefix at even ones
local gaps = 0
local prefix
local counter = 0

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local template = f:read("*a")
   f:close()
   local pos = 1
   while true do
      local s, e = string.find(template, "@@MID@@", pos, true)
      if not s then break end
      table.insert(pieces, string.sub(template, pos, s - 1))
      table.insert(pieces, "")
      gaps = gaps + 1
      pos = e + 1
   end
   table.insert(pieces, string.sub(template, pos))
   assert(gaps > 0, "the template has no @@MID@@ mark")
   prefix = args[2] .. "-" .. tostring(tid) .. "-"
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = args[3]
end

function request()
   counter = counter + 1
   local id = prefix .. counter
   for i = 2, 2 * gaps, 2 do
      pieces[i] = id
   end
   return wrk.format(nil, nil, nil, table.concat(pieces))
end

if os.getenv("WRK_CHECK") == "1" then
   bad = 0        -- globals: thread:get() reads them from done()
   bad_statuses = {}
   samples = {}

   function response(status, headers, body)
      if status < 200 or status > 299 then
         bad = bad + 1
         local code = tostring(status)
         bad_statuses[code] = (bad_statuses[code] or 0) + 1
         if #samples < 3 then  -- up to three different ones
            local sample = status .. " " .. string.sub(body or "", 1, 500)
            for _, s in ipairs(samples) do
               if s == sample then sample = nil break end
            end
            if sample then table.insert(samples, sample) end
         end
      end
   end
end

local function quote(s)
   return '"' .. tostring(s):gsub('[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end) .. '"'
end

function done(summary, latency, requests)
   local e = summary.errors
   local bad_total, statuses, bodies = 0, {}, {}
   for _, t in ipairs(threads) do
      local b = t:get("bad")
      if b then
         bad_total = bad_total + b
         for code, n in pairs(t:get("bad_statuses") or {}) do
            statuses[code] = (statuses[code] or 0) + n
         end
         for _, s in ipairs(t:get("samples") or {}) do
            table.insert(bodies, quote(s))
         end
      end
   end
   local codes = {}
   for code, n in pairs(statuses) do
      table.insert(codes, quote(code) .. ":" .. n)
   end
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d},' ..
      '"checked":%s,"bad":%d,"bad_statuses":{%s},"bad_samples":[%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9),
      tostring(os.getenv("WRK_CHECK") == "1"), bad_total,
      table.concat(codes, ","), table.concat(bodies, ",")))
end
