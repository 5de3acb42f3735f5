-- wrk script: replay prepared requests, one file line each: METHOD \t PATH \t HEADERS \t BODY
-- (HEADERS is "Name: value" pairs joined by "\1"). Each thread takes every Nth line.
-- args: FILE THREADS LOOP   (LOOP=1 cycles forever; LOOP=0 stops once each line was sent)

local counter = 1
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local file, threads, loop = args[1], tonumber(args[2]), args[3] == "1"
  requests = {}
  local i = 0
  for line in io.lines(file) do
    if i % threads == id - 1 then
      local method, path, headers, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      local h = {}
      for pair in headers:gmatch("[^\1]+") do
        local name, value = pair:match("^([^:]+):%s*(.*)$")
        h[name] = value
      end
      if body == "" then body = nil end
      requests[#requests + 1] = wrk.format(method, path, h, body)
    end
    i = i + 1
  end
  looping = loop
  sent = 0
  answered = 0
end

function request()
  sent = sent + 1
  local index = sent
  if looping then
    index = ((sent - 1) % #requests) + 1
  elseif index > #requests then
    index = #requests
  end
  return requests[index]
end

function response(status, headers, body)
  answered = answered + 1
  if status >= 300 then
    bad = (bad or 0) + 1
  end
  if not looping and answered >= #requests then
    wrk.thread:stop()
  end
end
