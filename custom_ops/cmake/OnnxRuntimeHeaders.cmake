# Locate the ONNX Runtime C/C++ API headers (onnxruntime_cxx_api.h & co).
#
# The onnxruntime wheels ship libonnxruntime.so but no headers, so unless the user passes
# -DONNXRUNTIME_INCLUDE_DIR=<dir containing onnxruntime_cxx_api.h> (e.g. the `include/` of an official ORT release
# tarball), we fetch Debian trixie's `libonnxruntime-dev` (ORT 1.21, ORT_API_VERSION 21) with apt-get *without*
# touching the system apt configuration: a private one-line sources file that reuses the mirror URI already
# configured on this machine, private package lists, `apt-get download`, `dpkg -x` into the build tree.
# The result is cached in the build tree, so re-configuring does not fetch again.
#
# API-21 headers give a library that loads into any ONNX Runtime >= 1.21.
#
# Sets ONNXRUNTIME_INCLUDE_DIR_EFFECTIVE, ORT_HEADERS_API_VERSION and ORT_HEADERS_SOURCE (provenance).

set(ONNXRUNTIME_INCLUDE_DIR "" CACHE PATH "Directory containing onnxruntime_cxx_api.h (skips the Debian fetch)")
set(QCOMPILER_ORT_DEBIAN_SUITE "trixie" CACHE STRING "Debian suite providing libonnxruntime-dev for the header fetch")

set(_ort_fix_hint
    "Pass -DONNXRUNTIME_INCLUDE_DIR=<dir containing onnxruntime_cxx_api.h>, e.g. the include/ folder of an "
    "official onnxruntime release tarball (any version >= 1.21). With pip: "
    "pip install . -Ccmake.define.ONNXRUNTIME_INCLUDE_DIR=/path/to/include")

function(_qc_ort_fail what)
  string(JOIN "" _hint ${_ort_fix_hint})
  message(FATAL_ERROR "qcompiler: could not obtain the ONNX Runtime headers: ${what}\n${_hint}")
endfunction()

# Mirror URI of the Debian archive configured on this machine (deb822 *.sources first, then sources.list).
function(_qc_debian_mirror out_var)
  set(_candidates "")
  file(GLOB _deb822 "/etc/apt/sources.list.d/*.sources")
  foreach(_f IN LISTS _deb822)
    file(STRINGS "${_f}" _lines REGEX "^[ \t]*URIs:")
    foreach(_l IN LISTS _lines)
      string(REGEX REPLACE "^[ \t]*URIs:[ \t]*" "" _uris "${_l}")
      string(REPLACE " " ";" _uris "${_uris}")
      list(APPEND _candidates ${_uris})
    endforeach()
  endforeach()
  file(GLOB _one_line "/etc/apt/sources.list" "/etc/apt/sources.list.d/*.list")
  foreach(_f IN LISTS _one_line)
    if(EXISTS "${_f}")
      file(STRINGS "${_f}" _lines REGEX "^[ \t]*deb[ \t]")
      foreach(_l IN LISTS _lines)
        string(REGEX REPLACE "\\[[^]]*\\]" "" _l "${_l}")  # drop [options]
        string(REGEX MATCH "[a-z]+://[^ \t]+" _uri "${_l}")
        if(_uri)
          list(APPEND _candidates "${_uri}")
        endif()
      endforeach()
    endif()
  endforeach()
  # The main archive, not the security one or third-party repositories: its path ends in /debian.
  set(_pick "")
  foreach(_u IN LISTS _candidates)
    string(REGEX REPLACE "/+$" "" _u "${_u}")
    if(_u MATCHES "/debian$")
      set(_pick "${_u}")
      break()
    endif()
  endforeach()
  set(${out_var} "${_pick}" PARENT_SCOPE)
endfunction()

function(_qc_fetch_debian_headers dest out_include)
  set(_inc "${dest}/root/usr/include/onnxruntime")
  if(EXISTS "${_inc}/onnxruntime_cxx_api.h")
    set(${out_include} "${_inc}" PARENT_SCOPE)
    return()
  endif()
  find_program(_APT_GET apt-get)
  find_program(_DPKG dpkg)
  if(NOT _APT_GET OR NOT _DPKG)
    _qc_ort_fail("apt-get/dpkg not found (the automatic fetch needs a Debian-based system).")
  endif()
  _qc_debian_mirror(_mirror)
  if(NOT _mirror)
    _qc_ort_fail("no Debian archive URI found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list.")
  endif()
  set(_keyring "/usr/share/keyrings/debian-archive-keyring.gpg")
  set(_opts "")
  if(EXISTS "${_keyring}")
    set(_opts "[signed-by=${_keyring}] ")
  endif()
  file(REMOVE_RECURSE "${dest}")
  file(MAKE_DIRECTORY "${dest}/lists/partial" "${dest}/cache/archives/partial" "${dest}/root")
  file(WRITE "${dest}/sources.list" "deb ${_opts}${_mirror} ${QCOMPILER_ORT_DEBIAN_SUITE} main\n")
  set(_apt_opts
      -o "Dir::Etc::SourceList=${dest}/sources.list"
      -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=${dest}/lists"
      -o "Dir::Cache=${dest}/cache"
      -o "APT::Sandbox::User=root"
      -o "Debug::NoLocking=1")
  message(STATUS "qcompiler: fetching libonnxruntime-dev from Debian ${QCOMPILER_ORT_DEBIAN_SUITE} (${_mirror})")
  execute_process(COMMAND "${_APT_GET}" ${_apt_opts} -q update
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    _qc_ort_fail("`apt-get update` for ${QCOMPILER_ORT_DEBIAN_SUITE} failed (${_rc}):\n${_out}${_err}")
  endif()
  execute_process(COMMAND "${_APT_GET}" ${_apt_opts} -q download libonnxruntime-dev
                  WORKING_DIRECTORY "${dest}"
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  file(GLOB _debs "${dest}/libonnxruntime-dev_*.deb")
  if(NOT _rc EQUAL 0 OR NOT _debs)
    _qc_ort_fail("`apt-get download libonnxruntime-dev` failed (${_rc}):\n${_out}${_err}")
  endif()
  list(GET _debs 0 _deb)
  execute_process(COMMAND "${_DPKG}" -x "${_deb}" "${dest}/root" RESULT_VARIABLE _rc ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_inc}/onnxruntime_cxx_api.h")
    _qc_ort_fail("`dpkg -x ${_deb}` did not produce ${_inc}/onnxruntime_cxx_api.h: ${_err}")
  endif()
  file(REMOVE_RECURSE "${dest}/lists" "${dest}/cache")
  get_filename_component(_deb_name "${_deb}" NAME)
  file(WRITE "${dest}/SOURCE.txt" "${_deb_name} from ${_mirror} ${QCOMPILER_ORT_DEBIAN_SUITE}\n")
  set(${out_include} "${_inc}" PARENT_SCOPE)
endfunction()

if(ONNXRUNTIME_INCLUDE_DIR)
  if(NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_cxx_api.h")
    _qc_ort_fail("ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} has no onnxruntime_cxx_api.h.")
  endif()
  set(ORT_HEADERS_SOURCE "ONNXRUNTIME_INCLUDE_DIR")
  set(ONNXRUNTIME_INCLUDE_DIR_EFFECTIVE "${ONNXRUNTIME_INCLUDE_DIR}")
else()
  set(_dest "${CMAKE_BINARY_DIR}/_deps/libonnxruntime-dev")
  _qc_fetch_debian_headers("${_dest}" _inc)
  set(ORT_HEADERS_SOURCE "Debian ${QCOMPILER_ORT_DEBIAN_SUITE} libonnxruntime-dev (cached in ${_dest})")
  set(ONNXRUNTIME_INCLUDE_DIR_EFFECTIVE "${_inc}")
endif()
file(STRINGS "${ONNXRUNTIME_INCLUDE_DIR_EFFECTIVE}/onnxruntime_c_api.h" _ver REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX MATCH "[0-9]+" ORT_HEADERS_API_VERSION "${_ver}")
if(ORT_HEADERS_API_VERSION LESS 17)
  _qc_ort_fail("headers in ${ONNXRUNTIME_INCLUDE_DIR_EFFECTIVE} are ORT_API_VERSION ${ORT_HEADERS_API_VERSION}; need >= 17.")
endif()
message(STATUS "qcompiler: ONNX Runtime headers (API ${ORT_HEADERS_API_VERSION}): ${ONNXRUNTIME_INCLUDE_DIR_EFFECTIVE} [${ORT_HEADERS_SOURCE}]")
