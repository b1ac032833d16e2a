# Finds vattn's dependencies (Debian packages: libabsl-dev, libfmt-dev,
# libgtest-dev, libbenchmark-dev; the CUDA toolkit is optional).
include(GNUInstallDirs)
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_package(Threads REQUIRED)
find_package(absl REQUIRED CONFIG)

if(VATTN_STATIC_DEPS)
  # Debian's Abseil config points its targets at the shared libraries; the
  # static archives sit beside them. Point every imported absl:: target at its
  # archive so the GPU bundle carries no Abseil .so.
  # find_package() above created the imported targets in this directory's
  # scope (absl_DIR is not a processed directory, so it cannot be queried).
  get_property(_vattn_imported DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  list(FILTER _vattn_imported INCLUDE REGEX "^absl::")
  set(_vattn_absl_targets ${_vattn_imported})
  if(NOT _vattn_absl_targets)
    file(STRINGS "${absl_DIR}/abslTargets.cmake" _lines REGEX "^add_library\\(absl::")
    foreach(_line IN LISTS _lines)
      string(REGEX MATCH "absl::[A-Za-z0-9_]+" _t "${_line}")
      list(APPEND _vattn_absl_targets ${_t})
    endforeach()
  endif()
  foreach(_t IN LISTS _vattn_absl_targets)
    if(TARGET ${_t})
      get_target_property(_type ${_t} TYPE)
      if(_type STREQUAL "SHARED_LIBRARY")
        get_target_property(_loc ${_t} IMPORTED_LOCATION_NONE)
        if(_loc)
          string(REGEX REPLACE "\\.so(\\.[0-9.]+)?$" ".a" _archive "${_loc}")
          if(EXISTS "${_archive}")
            set_target_properties(${_t} PROPERTIES
              IMPORTED_LOCATION_NONE "${_archive}"
              IMPORTED_LOCATION "${_archive}"
              IMPORTED_SONAME_NONE ""
              IMPORTED_SONAME "")
            list(APPEND _vattn_absl_static ${_t})
          endif()
        endif()
      endif()
    endif()
  endforeach()
  list(LENGTH _vattn_absl_static _n)
  if(_n EQUAL 0)
    message(FATAL_ERROR "VATTN_STATIC_DEPS: no Abseil target could be pointed at a static archive")
  endif()
  message(STATUS "vattn: ${_n} Abseil targets linked from static archives")
endif()

set(VATTN_HAVE_CUDA_HEADERS OFF)
if(NOT VATTN_WITH_CUDA STREQUAL "OFF")
  if(VATTN_WITH_CUDA STREQUAL "ON")
    find_package(CUDAToolkit REQUIRED)
  else()
    find_package(CUDAToolkit QUIET)
  endif()
  if(CUDAToolkit_FOUND AND EXISTS "${CUDAToolkit_INCLUDE_DIRS}/cuda.h")
    set(VATTN_HAVE_CUDA_HEADERS ON)
    message(STATUS "vattn: CUDA backend enabled (headers: ${CUDAToolkit_INCLUDE_DIRS})")
  elseif(VATTN_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "VATTN_WITH_CUDA=ON but cuda.h was not found")
  else()
    message(STATUS "vattn: CUDA toolkit not found; the CUDA backend reports Unavailable")
  endif()
endif()

# Sanitizers for every target: VATTN_SANITIZE is a -fsanitize= list
# ("thread", "address", "address,undefined"). Any report is fatal
# (-fno-sanitize-recover=all), so a UBSan finding fails its test instead of
# printing a line nobody reads. VATTN_FUZZ adds libFuzzer's coverage
# instrumentation (-fsanitize=fuzzer-no-link, clang only) to every target;
# the fuzz targets in tests/fuzz/ link libFuzzer itself.
if(VATTN_SANITIZE)
  if(NOT VATTN_SANITIZE MATCHES "^(thread|address|undefined|leak)(,(thread|address|undefined|leak))*$")
    message(FATAL_ERROR "VATTN_SANITIZE=${VATTN_SANITIZE}: expected a comma list of thread, address, undefined, leak")
  endif()
  add_compile_options(-fsanitize=${VATTN_SANITIZE} -fno-sanitize-recover=all
                      -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${VATTN_SANITIZE} -fno-sanitize-recover=all)
endif()
if(VATTN_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "VATTN_FUZZ needs clang++ (libFuzzer); configure with -DCMAKE_CXX_COMPILER=clang++")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link)
  add_link_options(-fsanitize=fuzzer-no-link)
endif()
