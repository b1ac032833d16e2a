# install(EXPORT) with a package config, so that an installed vattn is used as
#   find_package(vattn CONFIG REQUIRED)
#   target_link_libraries(app PRIVATE vattn::vattn)
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS vattn EXPORT vattnTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
if(TARGET vattn_c)
  # For other languages' FFIs, not for CMake consumers (they use vattn::vattn).
  install(TARGETS vattn_c LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
endif()
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/vattn
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT vattnTargets
  FILE vattnTargets.cmake
  NAMESPACE vattn::
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/vattn)
configure_package_config_file(
  ${PROJECT_SOURCE_DIR}/cmake/vattnConfig.cmake.in
  ${PROJECT_BINARY_DIR}/vattnConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/vattn)
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/vattnConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${PROJECT_BINARY_DIR}/vattnConfig.cmake
  ${PROJECT_BINARY_DIR}/vattnConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/vattn)
