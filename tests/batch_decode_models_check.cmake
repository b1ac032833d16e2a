# Runs `batch_decode --models=2` briefly and checks that its summary table
# and its SVG appear (ctest example.batch_decode_models).
#   cmake -DBIN=<batch_decode> -DSVG=<path> -P batch_decode_models_check.cmake
file(REMOVE "${SVG}")
execute_process(
  COMMAND "${BIN}" --models=2 --backend=host --budget_gib=1 --duration_s=8
          --burst_s=2 --svg=${SVG}
  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "batch_decode --models=2 exited with ${rc}")
endif()
# The table: its header, one row per model and memory mode, the ratio line.
foreach(want "TTFT p50" "TTFT p99" "peak phys" "from other"
             "arbiter      llama3-8b" "arbiter      yi-6b"
             "static split llama3-8b" "static split yi-6b"
             "arbiter / static split: served within the TTFT bound x"
             "arbiter telemetry at the end: {\"version\": 1")
  string(FIND "${out}" "${want}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "batch_decode --models=2: '${want}' is not in its output")
  endif()
endforeach()
if(NOT EXISTS "${SVG}")
  message(FATAL_ERROR "batch_decode --models=2 wrote no SVG at ${SVG}")
endif()
file(READ "${SVG}" svg)
foreach(want "<svg xmlns=\"http://www.w3.org/2000/svg\"" "<polyline" "arbiter:"
             "static split:" "llama3-8b" "yi-6b" "</svg>")
  string(FIND "${svg}" "${want}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the SVG lacks '${want}'")
  endif()
endforeach()
# Two panels of two caches each: four lines.
string(REGEX MATCHALL "<polyline" lines "${svg}")
list(LENGTH lines n)
if(NOT n EQUAL 4)
  message(FATAL_ERROR "the SVG has ${n} polylines, want 4 (2 runs x 2 caches)")
endif()
